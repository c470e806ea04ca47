"""CAM++ speaker encoder (192-d x-vectors): model, converters (torch / ONNX), batched API."""
from .modeling import CAMPPlus, SpeakerEncoder
from .params import from_onnx, from_torch_state_dict, onnx_to_state_dict, to_torch_state_dict

__all__ = ["CAMPPlus", "SpeakerEncoder", "from_onnx", "from_torch_state_dict", "onnx_to_state_dict",
           "to_torch_state_dict"]
