"""S3Tokenizer v2 (speech -> 25 Hz FSQ tokens): model, FSQ, converters, batched API."""
from .fsq import FSQCodebook, fsq_decode, fsq_quantize
from .modeling import AudioEncoderV2, S3TokenizerV2, SpeechTokenizer
from .params import from_onnx, from_torch_state_dict, onnx_to_state_dict, to_torch_state_dict

__all__ = ["AudioEncoderV2", "FSQCodebook", "S3TokenizerV2", "SpeechTokenizer", "fsq_decode", "fsq_quantize",
           "from_onnx", "from_torch_state_dict", "onnx_to_state_dict", "to_torch_state_dict"]
