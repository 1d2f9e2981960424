"""The ControlNet extension's units in AUTOMATIC1111's requests (`alwayson_scripts.controlnet.args`)
-> the control_image / scale / start / end of the engine's ControlNets.

Units name their model as the extension lists it ("name [hash]") or by name; preprocessors are not
run here, so a unit brings its control image made already (module "none").
"""

from __future__ import annotations

from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve.fields import number, picture

# The ControlNet extension's resize modes (names, old names, numbers) -> AUTOMATIC1111's img2img ones.
CONTROL_RESIZE = {"Just Resize": 0, "Crop and Resize": 1, "Resize and Fill": 2, "Scale to Fit (Inner Fit)": 1,
                  "Inner Fit (Scale to Fit)": 1, "Envelope (Outer Fit)": 2, "Outer Fit (Shrink to Fit)": 2,
                  0: 0, 1: 1, 2: 2}

def controlnet(script: dict, model) -> tuple[dict, list]:
    """The ControlNet extension's units ({"args": [unit, ...]}) -> control_image / scale / start /
    end of the engine's ControlNets: a unit names its model (as the extension lists it, "name
    [hash]", or the name alone) or, where the engine has one ControlNet, may leave it out.
    Preprocessors are not run here: send the control image already made (module "none")."""
    nets = [c["name"] for c in model.controlnets]
    units = script.get("args") if isinstance(script, dict) else None
    if not isinstance(units, list):
        raise InvalidRequest('alwayson_scripts.controlnet must be {"args": [unit, ...]}')
    if not nets:
        if any(isinstance(u, dict) and u.get("enabled", True) for u in units):
            raise InvalidRequest("this engine holds no ControlNet (ldm-export --controlnet adds one)")
        return {}, []
    pictures, scales = [None] * len(nets), [1.0] * len(nets)
    starts, ends = [0.0] * len(nets), [1.0] * len(nets)
    resizes = []
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            raise InvalidRequest(f"alwayson_scripts.controlnet.args[{i}] must be an object")
        image = unit.get("image", unit.get("input_image"))
        if isinstance(image, dict):
            image = image.get("image")
        if not unit.get("enabled", image is not None):
            continue
        where = f"ControlNet unit {i}"
        module = unit.get("module") or "none"
        if not isinstance(module, str) or module.lower() != "none":
            raise InvalidRequest(f"{where}: module {module!r}: preprocessors are not run here; send the control "
                                 "image already made (an edge map, a pose, ...) with module \"none\"")
        for key, fine in (("control_mode", ("Balanced", 0, None)), ("hr_option", ("Both", None)),
                          ("mask", (None,)), ("effective_region_mask", (None,)), ("ipadapter_input", (None,))):
            if not any(unit.get(key) == f and type(unit.get(key)) is type(f) for f in fine):
                raise InvalidRequest(f"{where}: {key} {unit[key]!r} is not offered here; leave it out")
        slot = slot_of(unit.get("model"), nets, where)
        if image is None:
            raise InvalidRequest(f"{where}: give its control image (\"image\": base64)")
        pictures[slot] = picture(image, f"{where}'s image").convert("RGB")
        scales[slot] = number(unit, "weight", 1.0)
        starts[slot] = number(unit, "guidance_start", 0.0)
        ends[slot] = number(unit, "guidance_end", unit.get("guidance", 1.0))
        mode = unit.get("resize_mode", "Crop and Resize")
        resize = CONTROL_RESIZE.get(mode) if isinstance(mode, (str, int)) else None
        if resize is None:
            raise InvalidRequest(f"{where}: resize_mode {unit['resize_mode']!r} is not one the ControlNet extension "
                                 f"knows ({', '.join(k for k in CONTROL_RESIZE if isinstance(k, str))})")
        resizes.append((resize, slot, f"{where}'s resize_mode"))
    if all(p is None for p in pictures):
        return {}, []
    one = len(nets) == 1
    return {"control_image": pictures[0] if one else pictures, "control_scale": scales[0] if one else scales,
            "control_start": starts[0] if one else starts, "control_end": ends[0] if one else ends}, resizes


def slot_of(name, nets: list[str], where: str) -> int:
    if name in (None, "", "None"):
        if len(nets) == 1:
            return 0
        raise InvalidRequest(f"{where}: name its model; this engine holds {', '.join(nets)}")
    stem = str(name).split(" [", 1)[0]
    for i, net in enumerate(nets):
        if stem in (net, net.rsplit(".", 1)[0]):
            return i
    raise InvalidRequest(f"{where}: model {name!r} is not in this engine, which holds {', '.join(nets)}")
