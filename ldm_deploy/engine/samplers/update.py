"""The sampler update, written once for numpy arrays and torch tensors alike.

The exported `unet_step` graph calls these on torch tensors; the sampler tests call them on
numpy arrays. A row of the coefficient table (see `COLUMNS`) drives one step:

    model_in = c_in * x                                   # what the U-Net sees
    x0       = p_x * x + p_m * model_out                  # epsilon / v -> x0 prediction
    x_next   = c_x * x + c_0 * x0 + c_p * x0_prev + c_n * noise + c_pp * x0_prev2
    state    = x0                                          # the next step's x0_prev

x0_prev2, the x0 of two steps back (UniPC's corrector), is an input of engines that keep it
(ModelFacts.history): the pipeline hands the step the buffer it wrote two steps ago.
"""

# Column order of one table row; the graph indexes the row by these positions. Engines without
# x0_prev2 take the first 9 (c_pp came last so that their positions stayed).
COLUMNS = ("timestep", "c_in", "p_x", "p_m", "c_x", "c_0", "c_p", "c_n", "guidance", "c_pp")
T, C_IN, P_X, P_M, C_X, C_0, C_P, C_N, GUIDANCE, C_PP = range(len(COLUMNS))


def model_input(row, x):
    """(B, C, h, w) latents -> the U-Net's input at this step."""
    return row[C_IN] * x


def guide(uncond, cond, row):
    """Classifier-free guidance, as diffusers writes it: u + g * (c - u).

    Without guidance the caller passes the conditional output as both arguments, and the
    result is exactly `cond`."""
    return uncond + row[GUIDANCE] * (cond - uncond)


def update(row, x, x0_prev, noise, model_out, x0_prev2=None):
    """One sampler step. Returns (x_next, x0): the new latents and the new state."""
    x0 = row[P_X] * x + row[P_M] * model_out
    x_next = row[C_X] * x + row[C_0] * x0 + row[C_P] * x0_prev + row[C_N] * noise
    if x0_prev2 is not None:
        x_next = x_next + row[C_PP] * x0_prev2
    return x_next, x0
