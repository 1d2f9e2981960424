"""The kernel tests run in Triton's CPU interpreter without a GPU (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports ldm_deploy.kernels) and on the GPU with one
(test_attention_gpu.py). The folder is not named `kernels`: see DESIGN.md."""
