"""Why an export produced no file: a case it cannot export, or a graph that does not reproduce PyTorch."""


class ExportRefused(ValueError):
    """The model, config or option cannot be exported as asked; the message names the cause and the way out."""


class ExportMismatch(ExportRefused):
    """The exported graph's logits differ from PyTorch's by more than the tolerance on a verification input."""
