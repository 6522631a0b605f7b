"""Feature extractors (torch-fidelity registry or identity) and the reference-feature cache.

A feature extractor turns a batch of samples into ``Features``: ``features`` ``[n, d]`` (used by
FID/FD, KID, precision/recall, density/coverage) and optionally ``logits`` ``[n, classes]`` (used
by the Inception Score). Both are float64 CPU tensors.

Sample conventions:

- **points**: float tensor ``[n, d]`` -> the identity extractor (features are the points).
- **images**: tensor ``[n, C, H, W]`` with C in {1, 3}: ``uint8`` in [0, 255], or float in
  [-1, 1] or [0, 1] (``image_range``; ``"auto"`` decides once from the reference data: any
  negative value means [-1, 1]). Grayscale is repeated to 3 channels. torch-fidelity's image
  extractors take uint8 ``[n, 3, H, W]`` and resize internally.

Reference features are cached as ``RUN_DIR/reference/<key>.npz`` (``np.load(allow_pickle=False)``),
keyed by extractor name + a hash of the extractor's weights (for a plain callable: its code and the
weights it closes over, :func:`callable_hash`) + a hash of the reference data, so a different
weights file never silently reuses stale features.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emascope.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_RANGES = ("auto", "-1,1", "0,1")


@dataclass
class Features:
    """Features of a set of samples: ``features`` [n, d] and optional ``logits`` [n, classes]."""

    features: torch.Tensor
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.features = _as_2d_float64("features", self.features)
        if self.logits is not None:
            self.logits = _as_2d_float64("logits", self.logits)
            if len(self.logits) != len(self.features):
                raise ValueError(f"logits have {len(self.logits)} rows, "
                                 f"features have {len(self.features)}")


def _as_2d_float64(name: str, x: Any) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float64)


# ----------------------------------------------------------------------------------------------
# sample kinds and image conversion


def sample_kind(samples: torch.Tensor) -> str:
    """``"points"`` for ``[n, d]`` tensors, ``"images"`` for ``[n, C, H, W]`` with C in {1, 3}."""
    if not torch.is_tensor(samples):
        raise ValueError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.dim() == 2 and _real(samples):
        return "points"
    if samples.dim() == 4 and samples.shape[1] in (1, 3):
        return "images"
    raise ValueError(f"samples must be [n, d] points (real numbers) or [n, C, H, W] images with C in (1, 3); "
                     f"got dtype {samples.dtype} shape {tuple(samples.shape)}")


def _real(t: torch.Tensor) -> bool:
    return not t.is_complex() and t.dtype != torch.bool


def check_samples(samples: torch.Tensor, what: str = "samples") -> str | None:
    """Refuse samples that cannot give an honest score; say what is converted.

    Floating samples holding any NaN/Inf raise ``ValueError`` with the count (a score of them, or
    of the black images they would turn into, would look real). Integer ``[n, d]`` points return
    a note saying they are converted (float64 features, float32 previews); anything else (float
    samples, uint8 images: the documented convention) returns ``None``.
    """
    if not torch.is_tensor(samples):
        return None
    if samples.is_floating_point() or samples.is_complex():
        bad = samples.numel() - int(torch.isfinite(samples).sum())
        if bad:
            raise ValueError(f"{what} hold {bad} non-finite values (NaN/Inf) of {samples.numel()}: "
                             "not scored (no metric is written for them)")
        return None
    if samples.dim() == 2 and _real(samples):
        return (f"{what} are {str(samples.dtype).removeprefix('torch.')} points [n, {samples.shape[1]}]: "
                "converted to float64 for features and metrics, to float32 for previews")
    return None


def check_finite_features(feats: Features, what: str = "features") -> None:
    """``ValueError`` with the count if features or logits hold NaN/Inf (no metric is computed)."""
    for name, t in (("features", feats.features), ("logits", feats.logits)):
        if t is None:
            continue
        bad = t.numel() - int(torch.isfinite(t).sum())
        if bad:
            rows = int((~torch.isfinite(t)).any(dim=1).sum())
            raise ValueError(f"{what}: {name} hold {bad} non-finite values (NaN/Inf) in {rows} of {len(t)} rows; "
                             "no metric is computed from them")


def resolve_image_range(image_range: str, reference: torch.Tensor | None) -> str:
    """Fix ``"auto"`` to ``"-1,1"`` or ``"0,1"`` from the reference images (uint8 stays as is)."""
    if image_range not in IMAGE_RANGES:
        raise ValueError(f"image_range must be one of {IMAGE_RANGES}, got {image_range!r}")
    if image_range != "auto":
        return image_range
    if reference is None or not torch.is_tensor(reference) or not reference.is_floating_point():
        return "-1,1"
    return "-1,1" if bool((reference < 0).any()) else "0,1"


def images_to_uint8(images: torch.Tensor, image_range: str = "-1,1") -> torch.Tensor:
    """Images ``[n, C, H, W]`` -> uint8 ``[n, 3, H, W]`` (float values clamped to the range)."""
    if sample_kind(images) != "images":
        raise ValueError(f"expected images [n, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        out = images
    elif images.is_floating_point():
        if image_range == "-1,1":
            x = (images.float() + 1.0) * 127.5
        elif image_range == "0,1":
            x = images.float() * 255.0
        else:
            raise ValueError(f"image_range must be '-1,1' or '0,1' here, got {image_range!r}")
        out = x.clamp(0, 255).round().to(torch.uint8)
    else:
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.contiguous()


# ----------------------------------------------------------------------------------------------
# extractors


class IdentityExtractor:
    """Features are the samples themselves (low-dimensional data, e.g. 2-D points)."""

    name = "identity"
    weights_hash = "none"
    has_logits = False

    def __call__(self, samples: torch.Tensor) -> Features:
        if samples.dim() != 2:
            raise ValueError(f"the identity extractor takes [n, d] samples, got shape {tuple(samples.shape)}")
        return Features(samples)


class CallableExtractor:
    """A user function ``samples -> features [n, d]`` (or ``(features, logits)``)."""

    has_logits = False

    def __init__(self, fn: Callable[[torch.Tensor], Any], batch_size: int = 256) -> None:
        self.fn = fn
        self.batch_size = int(batch_size)
        self.name = getattr(fn, "__name__", None) or type(fn).__name__
        self.weights_hash = callable_hash(fn)

    def __call__(self, samples: torch.Tensor) -> Features:
        feats, logits = [], []
        with torch.no_grad():
            for chunk in samples.split(self.batch_size):
                out = self.fn(chunk)
                if isinstance(out, tuple):
                    feats.append(torch.as_tensor(out[0]).detach().cpu())
                    logits.append(torch.as_tensor(out[1]).detach().cpu())
                else:
                    feats.append(torch.as_tensor(out).detach().cpu())
        return Features(torch.cat(feats), torch.cat(logits) if logits else None)


def load_weights_once(path: str | os.PathLike) -> io.BytesIO:
    """Read a weights file once, safely, and hand its tensors on as an in-memory file.

    torch-fidelity's extractors load ``feature_extractor_weights_path`` with
    ``torch.load(weights_only=False)``, which runs code from a hostile pickle; checking the file
    first with ``weights_only=True`` and then letting torch-fidelity read it again leaves a window in
    which the file can be swapped. So the file is read here, exactly once, with
    ``torch.load(weights_only=True)`` (plain tensors and containers only), and what torch-fidelity
    receives instead of the path is a ``BytesIO`` holding those tensors saved again by
    ``torch.save``: its ``torch.load`` (and any extractor that calls ``torch.load`` on the argument)
    reads our own serialisation of plain tensors. ``ValueError`` naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"feature_extractor_weights_path {str(path)!r} is not a file")
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for anything but plain tensors
        raise ValueError(f"feature_extractor_weights_path {str(path)!r} cannot be loaded safely "
                         f"(torch.load weights_only=True): {type(exc).__name__}: {str(exc)[:500]}") from None
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


class TorchFidelityExtractor:
    """A feature extractor from torch-fidelity's registry (``register_feature_extractor``).

    ``name``: registered name (``"inception-v3-compat"`` by default for images);
    ``weights_path``: local weights file (no download), read once with ``weights_only=True`` and
    passed to the extractor as ``feature_extractor_weights_path`` in the form of an in-memory file
    holding those tensors (:func:`load_weights_once`; ``torch.load`` reads it like a path);
    ``device``: where the extractor runs ("cpu", "cuda:0").
    Features come from the extractor's default FID layer, logits from its default ISC layer
    (when it provides one, e.g. Inception's ``logits_unbiased``).
    """

    def __init__(self, name: str = "inception-v3-compat", *, weights_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 image_range: str = "-1,1") -> None:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature extractor {name!r} is not registered with torch-fidelity; "
                             f"known: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
        weights = load_weights_once(weights_path) if weights_path is not None else None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.feature_layer = cls.get_default_feature_layer_for_metric("fid")
        try:
            logits_layer = cls.get_default_feature_layer_for_metric("isc")
        except Exception:  # extractors without a classifier head
            logits_layer = None
        if logits_layer not in cls.get_provided_features_list() or logits_layer == self.feature_layer:
            logits_layer = None
        self.logits_layer = logits_layer
        layers = [self.feature_layer] + ([logits_layer] if logits_layer else [])
        kwargs: dict[str, Any] = {"verbose": False}
        if weights is not None:
            # the tensors read once above, re-serialised in memory: torch-fidelity's own
            # torch.load(weights_only=False) unpickles our plain tensors, never the file again
            kwargs["feature_extractor_weights_path"] = weights
        self.module = cls(name, layers, **kwargs).to(device).eval().requires_grad_(False)
        self.name = name
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.image_range = image_range
        self.has_logits = self.logits_layer is not None
        self.weights_hash = module_hash(self.module)

    def __call__(self, samples: torch.Tensor) -> Features:
        images = images_to_uint8(samples, self.image_range)
        feats: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        with torch.no_grad():
            for chunk in images.split(self.batch_size):
                out = self.module.convert_features_tuple_to_dict(self.module(chunk.to(self.device)))
                feats.append(out[self.feature_layer].cpu())
                if self.logits_layer is not None:
                    logits.append(out[self.logits_layer].cpu())
        return Features(torch.cat(feats), torch.cat(logits) if logits else None)


class SmallImageExtractor:
    """The built-in small-image extractor (:mod:`emascope.small_images`): fixed weights, no download,
    256-d features, no logits. Runs on ``device`` in chunks of ``batch_size`` images."""

    has_logits = False

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 64,
                 image_range: str = "-1,1") -> None:
        from emascope.small_images import NAME, SmallImageFeatures

        self.name = NAME
        self.module = SmallImageFeatures().to(device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.image_range = image_range
        self.weights_hash = module_hash(self.module)

    def __call__(self, samples: torch.Tensor) -> Features:
        feats = [self.module(chunk, self.image_range).cpu() for chunk in samples.split(self.batch_size)]
        return Features(torch.cat(feats))


Extractor = IdentityExtractor | TorchFidelityExtractor | CallableExtractor | SmallImageExtractor

#: The default extractor of ``"auto"`` for images, and the built-in one for small images.
INCEPTION = "inception-v3-compat"
SMALL_IMAGES = "small-images-v1"
#: Extractors emascope itself provides (no torch-fidelity registration, no download).
BUILTIN_EXTRACTORS = (SMALL_IMAGES,)
#: ``"auto"`` gives images whose shorter side is below this many pixels the built-in small-image
#: extractor: Inception-v3 sees them upsampled to 299x299, far outside what it was trained on.
AUTO_MIN_INCEPTION_SIZE = 32


def auto_extractor(kind: str, image_size: tuple[int, int] | None = None) -> str:
    """What ``"auto"`` means: ``identity`` for points; for images Inception-v3, or the built-in
    small-image extractor when the images are smaller than :data:`AUTO_MIN_INCEPTION_SIZE` pixels."""
    if kind == "points":
        return "identity"
    if image_size is not None and min(image_size) < AUTO_MIN_INCEPTION_SIZE:
        return SMALL_IMAGES
    return INCEPTION


def make_extractor(spec: str | Callable | None, kind: str, *, weights_path: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", batch_size: int = 64,
                   image_range: str = "-1,1", image_size: tuple[int, int] | None = None) -> Extractor:
    """Build the extractor for ``spec``: ``None``/``"auto"`` (:func:`auto_extractor`: identity for
    points, Inception-v3 for images, the built-in small-image one for images below 32 px),
    ``"identity"``, ``"small-images-v1"``, a torch-fidelity registered name, or a callable."""
    if callable(spec) and not isinstance(spec, str):
        return CallableExtractor(spec, batch_size=batch_size)
    if spec in (None, "auto"):
        spec = auto_extractor(kind, image_size)
    if spec == "identity":
        return IdentityExtractor()
    if spec == SMALL_IMAGES:
        return SmallImageExtractor(device=device, batch_size=batch_size, image_range=image_range)
    if not isinstance(spec, str):
        raise ValueError("feature_extractor must be 'auto', 'identity', a torch-fidelity name or a "
                         f"callable, "
                         f"got {spec!r}")
    return TorchFidelityExtractor(spec, weights_path=weights_path, device=device, batch_size=batch_size,
                                  image_range=image_range)


# ----------------------------------------------------------------------------------------------
# hashing and the reference cache


def tensor_hash(t: torch.Tensor, h: Any = None) -> str:
    """sha256 over dtype, shape and raw bytes of a tensor (updates ``h`` if given)."""
    h = h or hashlib.sha256()
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_hash(module: nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes, bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        if torch.is_tensor(value):
            tensor_hash(value, h)
    return h.hexdigest()[:16]


def callable_hash(fn: Any) -> str:
    """A hash of what a callable extractor computes, first 16 hex digits, for the cache key.

    ``nn.Module``: its state_dict (:func:`module_hash`). Functions (and bound methods, partials):
    qualified name, bytecode and constants, plus the weights of any module or tensor it closes
    over, is bound to, or takes as default/partial argument. So editing the function or changing
    the weights it uses gives a new key; state the callable reaches through globals is not seen.
    """
    if isinstance(fn, nn.Module):
        return module_hash(fn)
    h = hashlib.sha256()
    _hash_callable(fn, h, depth=0)
    return h.hexdigest()[:16]


def _hash_callable(obj: Any, h: Any, depth: int) -> None:
    if depth > 4:
        return
    if isinstance(obj, nn.Module):
        h.update(f"module:{type(obj).__qualname__}:{module_hash(obj)}".encode())
        return
    if torch.is_tensor(obj):
        tensor_hash(obj, h)
        return
    if isinstance(obj, functools.partial):
        _hash_callable(obj.func, h, depth + 1)
        for value in (*obj.args, *obj.keywords.values()):
            _hash_callable(value, h, depth + 1)
        return
    if inspect.ismethod(obj):
        _hash_callable(obj.__self__, h, depth + 1)
        obj = obj.__func__
    code = getattr(obj, "__code__", None)
    if code is None:  # a callable object: its class and its tensor/module attributes
        h.update(f"{type(obj).__module__}.{type(obj).__qualname__}:"
                 f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}".encode())
        for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
            if isinstance(value, nn.Module) or torch.is_tensor(value):
                _hash_callable(value, h, depth + 1)
        call_code = getattr(inspect.getattr_static(type(obj), "__call__", None), "__code__", None)
        if call_code is not None:
            _hash_code(call_code, h)
        return
    h.update(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}".encode())
    _hash_code(code, h)
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if isinstance(value, nn.Module) or torch.is_tensor(value) or callable(value):
            _hash_callable(value, h, depth + 1)
    for value in getattr(obj, "__defaults__", None) or ():
        if isinstance(value, nn.Module) or torch.is_tensor(value):
            _hash_callable(value, h, depth + 1)


def _hash_code(code: Any, h: Any) -> None:
    h.update(code.co_code)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(const, h)  # nested functions and lambdas
        else:
            h.update(repr(const).encode())


def reference_identity(reference: Any, max_items: int | None = None) -> str:
    """A content hash of the reference data (tensor/ndarray: all bytes; dataset: length + items).

    Datasets are identified by class name, length and the content of up to 16 evenly spaced items
    (hashing everything would mean reading the whole dataset on every start).
    """
    h = hashlib.sha256()
    if isinstance(reference, np.ndarray):
        reference = torch.from_numpy(np.ascontiguousarray(reference))
    if torch.is_tensor(reference):
        n = len(reference) if max_items is None else min(len(reference), max_items)
        tensor_hash(reference[:n], h)
    elif hasattr(reference, "__len__") and hasattr(reference, "__getitem__"):
        n = len(reference) if max_items is None else min(len(reference), max_items)
        h.update(f"{type(reference).__module__}.{type(reference).__qualname__}:{n}".encode())
        for i in sorted({int(j) for j in np.linspace(0, max(n - 1, 0), num=min(16, n))}):
            item = reference[i]
            item = item[0] if isinstance(item, (tuple, list)) else item
            tensor_hash(torch.as_tensor(np.asarray(item)), h)
    else:
        raise ValueError("reference must be a tensor, ndarray, dataset or Features, "
                         f"got {type(reference).__name__}")
    return h.hexdigest()[:16]


def reference_tensor(reference: Any, max_items: int | None = None) -> torch.Tensor:
    """Materialise the reference samples as one tensor (datasets: first element of each item)."""
    if isinstance(reference, np.ndarray):
        return torch.from_numpy(np.array(reference[:max_items]))
    if torch.is_tensor(reference):
        return reference[:max_items].detach().cpu()
    n = len(reference) if max_items is None else min(len(reference), max_items)
    items = []
    for i in range(n):
        item = reference[i]
        item = item[0] if isinstance(item, (tuple, list)) else item
        items.append(torch.as_tensor(np.asarray(item)))
    return torch.stack(items)


def cache_key(extractor_name: str, weights_hash: str, ref_identity: str) -> str:
    """File stem of a cached reference: safe characters only."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in extractor_name)
    return f"{safe}-{weights_hash}-{ref_identity}"


def save_cached(path: str | os.PathLike, feats: Features) -> None:
    """Write features (and logits) as an ``.npz`` atomically."""
    arrays = {"features": feats.features.numpy()}
    if feats.logits is not None:
        arrays["logits"] = feats.logits.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_cached(path: str | os.PathLike) -> Features | None:
    """Read cached features; ``None`` if missing or unreadable (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Features(torch.from_numpy(z["features"]),
                            torch.from_numpy(z["logits"]) if "logits" in z.files else None)
    except FileNotFoundError:
        return None
    except Exception as exc:  # torn or foreign file: recompute
        log.warning("ignoring unreadable reference cache %s: %s", path, exc)
        return None


def extract_in_batches(extractor: Callable[[torch.Tensor], Features], samples: torch.Tensor,
                       batch_size: int) -> Features:
    """Run ``extractor`` over ``samples`` in chunks of ``batch_size`` and concatenate."""
    parts = [extractor(chunk) for chunk in samples.split(max(1, int(batch_size)))]
    logits: Sequence[torch.Tensor | None] = [p.logits for p in parts]
    return Features(torch.cat([p.features for p in parts]),
                    torch.cat(list(logits)) if all(x is not None for x in logits) else None)


# ----------------------------------------------------------------------------------------------
# checks at attach: the reference's kind and the extractor (built before anything is written)


def reference_sample_info(reference: Any) -> tuple[str | None, tuple[int, int] | None]:
    """``(kind, (H, W))`` of a data reference from its first item (``(None, None)`` when it is not a
    point or image tensor, e.g. a custom sample type for a callable extractor)."""
    try:
        first = reference_tensor(reference, 1)
        kind = sample_kind(first)
    except (ValueError, TypeError, IndexError, RuntimeError):
        return None, None
    return kind, (tuple(int(x) for x in first.shape[-2:]) if kind == "images" else None)  # type: ignore[return-value]


def check_reference_kind(reference: Any, spec: Any) -> None:
    """``ValueError`` when a data reference cannot go through the extractor ``spec``: fewer than two
    items, items that are neither points nor images (unless ``spec`` is a callable), images with
    ``"identity"``, or points with an image extractor."""
    try:
        n = len(reference)
    except TypeError:
        n = None
    if n is not None and n < 2:
        raise ValueError(f"reference holds {n} item(s); the metrics need at least 2")
    if callable(spec) and not isinstance(spec, str):
        return
    kind, _ = reference_sample_info(reference)
    if kind is None:
        raise ValueError("reference items must be float points [d] or images [C, H, W] with C in (1, 3) "
                         "(uint8 or float); for other sample types pass feature_extractor=<callable>")
    if kind == "images" and spec == "identity":
        raise ValueError("feature_extractor='identity' takes points [n, d], but the reference holds images: "
                         "use 'auto', a torch-fidelity extractor, 'small-images-v1' or a callable")
    if kind == "points" and isinstance(spec, str) and spec not in (None, "auto", "identity"):
        raise ValueError(f"feature_extractor={spec!r} takes images, but the reference holds points [n, d]: "
                         "use 'auto' or 'identity'")


def _download_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a failed download (no network, DNS, HTTP, SSL, timeout)."""
    import socket
    import ssl
    import urllib.error

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (urllib.error.URLError, socket.error, ssl.SSLError, TimeoutError, ConnectionError)):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def _inception_weights() -> tuple[str, Path]:
    """URL and torch-hub cache path of torch-fidelity's Inception-v3 weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    name = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return URL_INCEPTION_V3, Path(torch.hub.get_dir()) / "checkpoints" / name


def offline_message(spec: str, cause: str, url: str | None = None, cached: Path | None = None) -> str:
    """What to do when ``spec``'s weights cannot be downloaded: the file to pass and the offline options."""
    if url is not None and cached is not None:
        file = cached.name
        return (f"feature extractor {spec!r} needs its weights file {file}: it is not in the torch hub cache "
                f"({cached.parent}) and cannot be downloaded from {url} ({cause}). Offline: copy that file here and "
                f"pass feature_extractor_weights_path='/path/to/{file}' (or put it in the cache folder); or pass "
                f"feature_extractor='{SMALL_IMAGES}' (built in, no download; its FD is not comparable to FID)")
    return (f"feature extractor {spec!r} could not download its weights ({cause}). Offline: pass "
            f"feature_extractor_weights_path=<local weights file>, or feature_extractor='{SMALL_IMAGES}' "
            "(built in, no download; not comparable to FID)")


def _reachable(url: str, timeout: float = 10.0) -> str | None:
    """``None`` when a TCP connection to ``url``'s host opens within ``timeout`` s, else the reason."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def open_extractor(spec: str | Callable | None, kind: str, **kwargs: Any) -> Extractor:
    """:func:`make_extractor` at attach, with failures turned into a ``ValueError`` that says what to do.

    For Inception without ``weights_path`` whose weights are not in the torch hub cache, the
    download host is probed first (10 s at most), so an offline machine gets the error at once
    instead of a download that hangs; the message names the file to pass and the offline options.
    """
    name = spec
    if spec in (None, "auto"):
        name = auto_extractor(kind, kwargs.get("image_size"))
    if name == INCEPTION and kwargs.get("weights_path") is None:
        url, cached = _inception_weights()
        if not cached.is_file():
            why = _reachable(url)
            if why is not None:
                raise ValueError(offline_message(INCEPTION, why, url, cached))
    try:
        return make_extractor(spec, kind, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001
        cause = f"{type(exc).__name__}: {exc}"
        if isinstance(name, str) and kwargs.get("weights_path") is None and _download_error(exc):
            if name == INCEPTION:
                url, cached = _inception_weights()
                raise ValueError(offline_message(INCEPTION, cause, url, cached)) from exc
            raise ValueError(offline_message(name, cause)) from exc
        raise ValueError(f"feature extractor {name!r} could not be built: {cause}") from exc
