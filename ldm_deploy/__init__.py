"""ldm-deploy: a deployment engine for latent diffusion models."""

__version__ = "0.1.0"

from ldm_deploy.errors import UserError  # noqa: E402


def __getattr__(name):
    # Pipeline pulls in onnxruntime; import it lazily so `ldm_deploy.export` stays cheap.
    if name == "Pipeline":
        from ldm_deploy.engine.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)


__all__ = ["Pipeline", "UserError", "__version__"]
