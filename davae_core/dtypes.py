"""Names of the floating-point dtypes a config or a CLI may ask for (``"bfloat16"`` -> ``torch.bfloat16``)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str, where: str = "dtype") -> torch.dtype:
    """The dtype called ``name``; ``where`` names the setting in the error message."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{where}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
