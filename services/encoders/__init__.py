"""Named pathology foundation encoders with weights from local files.

Each encoder (UNI, UNI2-h, H-optimus-0, H0-mini, Virchow2, Prov-GigaPath, Phikon-v2,
CONCH, a truncated ResNet-50, our own cancer detector's trunk and our six biomarker
CNNs together) is built locally with the published architecture and random weights,
then given the weights of a file the user provides: nothing is ever downloaded. The
biomarker CNNs' file is made from trained bundles by :func:`combine_bundles`.

    >>> encoder = load_encoder("uni", "/models/uni/pytorch_model.bin")
    >>> embeddings = encoder.embed(patches)  # uint8 (N, H, W, 3) at 0.5 µm/px
    >>> card = encoder.model_card_entry()   # name, licence, sha256, ...

The specs (:mod:`.registry`) say what each expects (input side, µm/px, colour
normalisation) and returns (width, pooling) and under which licence its weights are
published; several are non-commercial.
"""

from services.encoders.architectures import build_encoder, tiny_spec
from services.encoders.biomarker_cnns import combine_bundles
from services.encoders.loading import LoadedEncoder, effective_spec, load_encoder
from services.encoders.registry import ENCODERS, EncoderSpec, encoder_names, encoder_spec

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "LoadedEncoder",
    "build_encoder",
    "combine_bundles",
    "effective_spec",
    "encoder_names",
    "encoder_spec",
    "load_encoder",
    "tiny_spec",
]
