"""Object discovery over a collection, in two passes over its feature maps.

Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised object discovery for instance
recognition", WACV 2018 (arXiv 1709.04725):

* pass 1, per batch of feature maps A [B, h, w, C]: FS maps (`feature_saliency_map`),
  EGM regions on them (`egm_regions`), each region max-pooled in its box and
  L2-normalised (`regional_descriptors`); kept on the host: one C-vector per region.
  Then, on all regions: PCA whitening learned on them
  (`retrieval_jax.descriptors.learn_pca_whitening`), the reciprocal kNN graph of regions
  of different images (`region_graph`) and its Katz centrality g (`region_centrality`);
* pass 2, per batch: the local descriptors u_p = l2(whiten(l2(A(p)))) of every position,
  their n nearest regions of other images (`other_image_neighbours`), the OS map
  S(p) = F^(p) sum_{i in N_p} max(<v_i, u_p>, 0) f_i g_i (`object_saliency`), with f_i the
  region's FS mass as a share of its image's FS mass, then the OS.EGM descriptor
  (`egm_descriptor` on S) and its FS.EGM ablation (on F).

Memory: one batch of feature maps at a time, plus the regional descriptors
(regions x C floats) and the graph's neighbour lists; never a [regions, regions] array.
Each pass shows a progress bar.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._progress import progress
from ..descriptors.whitening import Whitening, apply_whitening, learn_pca_whitening
from ..graph import NormalizedGraph, normalize
from .descriptor import regional_descriptors, sum_regions
from .egm import Regions, egm_regions_traced
from .regions import GRAPH_METHODS, other_image_neighbours, region_centrality, region_graph
from .saliency_maps import check_feature_maps, feature_saliency_map, object_saliency

__all__ = ["CollectedRegions", "Discovery", "collect_regions", "discover", "feature_map_batches", "whitening_dim"]


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What `discover` found in a collection of N images with R regions (host arrays).

    Attributes:
      descriptors: float32[N, D] OS.EGM global descriptors.
      fs_descriptors: float32[N, D] FS.EGM descriptors (the ablation without the collection).
      regions: `Regions` [N, C] detected on the FS maps (the graph's nodes).
      os_regions: `Regions` [N, C] detected on the OS maps (those of OS.EGM).
      region_image: int32[R] image of each region (the valid slots of ``regions``, image by image).
      region_slot: int32[R] its slot in ``regions``.
      region_descriptors: float32[R, D] whitened, L2-normalised regional descriptors v_i.
      region_mass: float32[R] f_i, the region's FS mass over its image's FS mass (or the
        FS mass itself with ``relative_mass=False``).
      centrality: float32[R] Katz centrality g_i.
      graph: the normalised region graph W.
      whitening: the PCA whitening learned on the regions.
      os_maps: the OS maps, one float32[h, w] per image (None unless ``keep_maps``).
      fs_maps: the FS maps likewise.
      empty_os: int, images whose OS map was all zero (their OS.EGM descriptor is the FS.EGM one).
    """

    descriptors: np.ndarray
    fs_descriptors: np.ndarray
    regions: Regions
    os_regions: Regions
    region_image: np.ndarray
    region_slot: np.ndarray
    region_descriptors: np.ndarray
    region_mass: np.ndarray
    centrality: np.ndarray
    graph: NormalizedGraph
    whitening: Whitening | None
    os_maps: list | None = None
    fs_maps: list | None = None
    empty_os: int = 0

    @property
    def num_images(self) -> int:
        return self.descriptors.shape[0]

    @property
    def num_regions(self) -> int:
        return self.region_image.shape[0]


def feature_map_batches(feature_maps, batch_size: int = 32) -> Callable[[], Iterable]:
    """A re-iterable source of batches [b, h, w, C] from an array [N, h, w, C] (numpy, memmap
    or JAX; sliced lazily, so a memmap is read one batch at a time)."""
    batch_size = _checks.check_positive_int(batch_size, "batch_size")
    shape = getattr(feature_maps, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"feature_maps must be an array [N, h, w, C], got shape {shape}")

    def batches():
        for start in range(0, shape[0], batch_size):
            yield feature_maps[start:start + batch_size]

    batches.num_batches = -(-shape[0] // batch_size)
    return batches


def _source(feature_maps, batch_size):
    """(callable returning a fresh iterator of batches, number of batches or None)."""
    if hasattr(feature_maps, "shape"):
        fn = feature_map_batches(feature_maps, batch_size)
        return fn, fn.num_batches
    if callable(feature_maps):
        return feature_maps, getattr(feature_maps, "num_batches", None)
    if isinstance(feature_maps, (list, tuple)):
        return (lambda: iter(feature_maps)), len(feature_maps)
    raise TypeError("feature_maps must be an array [N, h, w, C], a list of batches [b, h, w, C], or a callable "
                    "returning a fresh iterable of batches (discover reads them twice); got "
                    f"{type(feature_maps).__name__}")


@jax.jit
def _local(a, whitening):
    """u_p = whiten(l2(max(A(p), 0))), L2-normalised: [B, h, w, D]."""
    a = jnp.maximum(a, 0.0)
    u = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    return apply_whitening(whitening, u) if whitening is not None else u


@dataclasses.dataclass(frozen=True)
class CollectedRegions:
    """The regions of pass 1 (`collect_regions`), R of them over N images (host arrays).

    Attributes:
      descriptors: float32[R, C] max-pooled (or GeM), L2-normalised, not whitened.
      image: int32[R] the image of each region.
      slot: int32[R] its slot in ``regions``.
      mass: float32[R] its FS mass (`Regions.mass`).
      image_mass: float32[R] the FS mass of its image (sum of the image's FS map).
      regions: `Regions` [N, capacity] of every image.
      num_images: N.
    """

    descriptors: np.ndarray
    image: np.ndarray
    slot: np.ndarray
    mass: np.ndarray
    image_mass: np.ndarray
    regions: Regions
    num_images: int


def collect_regions(feature_maps, *, batch_size: int = 32, c: float = 2.0, p: float | None = None,
                    fs_eps: float = 1e-6, show_progress: bool | None = None,
                    egm_options: dict | None = None) -> CollectedRegions:
    """Pass 1 of `discover`: per batch, FS maps, their EGM regions and regional descriptors.

    Only the valid regions' C-vectors are kept on the host; one batch of feature maps
    is in memory at a time. Arguments as in `discover` (``feature_maps`` may also be a
    one-shot iterable here: it is read once).

    Raises:
      ValueError: a bad batch (`check_feature_maps`), mixed channel counts, an empty
        collection, or a collection of one image.
    """
    if callable(feature_maps) or hasattr(feature_maps, "shape") or isinstance(feature_maps, (list, tuple)):
        source, total = _source(feature_maps, batch_size)
        batches = source()
    else:
        batches, total = iter(feature_maps), None
    opts = dict(egm_options or {})
    raw, images, slots, masses, image_masses, regions_all = [], [], [], [], [], []
    n_images, channels = 0, None
    for batch in progress(batches, desc="discovery pass 1: FS maps, EGM regions", total=total,
                          enable=show_progress):
        a = check_feature_maps(batch, "a feature map batch", ndim=4)
        if channels is None:
            channels = a.shape[-1]
        elif a.shape[-1] != channels:
            raise ValueError(f"feature map batches must share the channel count: {channels} then {a.shape[-1]}")
        fs = feature_saliency_map(a, fs_eps)
        reg = egm_regions_traced(fs, **opts)
        vec = np.asarray(regional_descriptors(a, reg, c=c, p=p))
        valid = np.asarray(reg.valid)
        total_mass = np.asarray(jnp.sum(fs, axis=(-2, -1)))
        b_idx, s_idx = np.nonzero(valid)
        raw.append(vec[b_idx, s_idx])
        images.append(b_idx + n_images)
        slots.append(s_idx)
        masses.append(np.asarray(reg.mass)[b_idx, s_idx])
        image_masses.append(total_mass[b_idx])
        regions_all.append(jax.tree_util.tree_map(np.asarray, reg))
        n_images += a.shape[0]
    if n_images == 0:
        raise ValueError("the collection is empty: no feature map batch was given")
    if n_images < 2:
        raise ValueError("a collection of one image: object discovery finds what recurs across images, "
                         "it needs at least 2")
    return CollectedRegions(descriptors=np.concatenate(raw).astype(np.float32),
                            image=np.concatenate(images).astype(np.int32),
                            slot=np.concatenate(slots).astype(np.int32),
                            mass=np.concatenate(masses).astype(np.float32),
                            image_mass=np.concatenate(image_masses).astype(np.float32),
                            regions=jax.tree_util.tree_map(lambda *x: np.concatenate(x), *regions_all),
                            num_images=n_images)


def whitening_dim(channels: int, num_regions: int, requested: int | None = None) -> int:
    """The PCA-whitening dimension `discover` learns on ``num_regions`` regions of
    ``channels`` channels: ``requested`` (lowered to num_regions - 1 with a warning: PCA on
    R samples has at most R - 1 directions; one above C is refused), else
    min(C, R - 1, max(32, R // 8)), at least 1."""
    most = max(1, int(num_regions) - 1)
    if requested is None:
        return max(1, min(int(channels), most, max(32, int(num_regions) // 8)))
    requested = _checks.check_positive_int(requested, "whiten_dim")
    if requested > int(channels):
        raise ValueError(f"whiten_dim = {requested} exceeds the {channels} channels of the feature maps; "
                         f"choose whiten_dim <= {channels}")
    if requested > most:
        warnings.warn(f"whiten_dim = {requested} exceeds the {most} directions that {num_regions} regions "
                      f"span; whitening to {most}", RuntimeWarning, stacklevel=3)
        return most
    return requested


def discover(feature_maps, *, batch_size: int = 32, k: int = 10, gamma: float = 3.0, alpha: float = 0.99,
             os_neighbours: int = 10, c: float = 2.0, p: float | None = None, whiten: bool = True,
             whiten_dim: int | None = None, shrinkage: float = 0.0, same_image_edges: bool = False,
             fs_eps: float = 1e-6, relative_mass: bool = True, keep_maps: bool = False, method: str = "auto",
             graph_method: str | None = None, show_progress: bool | None = None,
             egm_options: dict | None = None) -> Discovery:
    """Unsupervised object discovery in a collection (Simeoni et al., WACV 2018): two passes.

    Args:
      feature_maps: the collection's last conv maps: an array [N, h, w, C] (sliced into
        ``batch_size`` batches), a list of batches [b, h, w, C], or a callable returning a
        fresh iterable of batches each time (e.g. a backbone over a folder of images).
        Batches may differ in h, w, not in C. Read twice.
      batch_size: images per batch when ``feature_maps`` is an array.
      k: neighbours per region in the region graph.
      gamma: affinity exponent of the graph.
      alpha: Katz centrality's alpha in (0, 1).
      os_neighbours: |N_p|, regions of other images voting for a position of the OS map.
      c: region box half-width in standard deviations (`region_boxes`).
      p: None for max-pooled regions (the paper's), else the GeM exponent.
      whiten: learn PCA whitening on the regions (the paper's); False keeps raw L2 vectors.
      whiten_dim: whitened dimension; default min(C, R - 1, max(32, R // 8)) for R regions
        (`whitening_dim`: at least 8 regions per learned dimension beyond the first 32;
        on a few hundred regions the full min(C, R - 1) whitening fits noise and ranks
        near chance). A value above R - 1 is lowered to R - 1 with a warning.
      shrinkage: covariance shrinkage of the whitening (`learn_pca_whitening`).
      same_image_edges: keep graph edges between regions of one image (default dropped).
      fs_eps: eps of the FS channel weights.
      relative_mass: f_i is the region's share of its image's FS mass (default, our
        reading: every image votes with the same total, whatever its activation
        scale); False uses the region's FS mass itself.
      keep_maps: keep the FS and OS maps in the result.
      method: the neighbour search of pass 2, positions against the regions
        (`retrieval_jax.graph.knn`: "auto", "exact" or "faiss"), and of the region graph
        unless ``graph_method`` is given.
      graph_method: the region graph's search (`region_graph`: "auto", "exact", "faiss"
        or "nndescent", approximate, for large collections; its "auto" runs NN-descent
        from `NNDESCENT_MIN_REGIONS` regions on); None: ``method``.
      show_progress: progress bars (None: by number of batches).
      egm_options: `egm_regions` keywords for both detections (capacity, iterations, ...).

    Returns:
      `Discovery`.

    Raises:
      ValueError: a bad batch (empty, NaN / inf, an image with no positive activation:
        `check_feature_maps`), mixed channel counts, a collection of one image, or
        too few regions for k.
    """
    if hasattr(feature_maps, "shape") and len(feature_maps.shape) == 4 and feature_maps.shape[0] < 2:
        raise ValueError(f"a collection of {feature_maps.shape[0]} image(s): object discovery finds what recurs "
                         "across images, it needs at least 2")
    if method == "nndescent":
        raise ValueError("discover's method also searches the positions of every image against the regions "
                         "(pass 2), which NN-descent, a self-search, cannot: pass graph_method='nndescent' "
                         "for the region graph instead")
    if method not in GRAPH_METHODS or (graph_method is not None and graph_method not in GRAPH_METHODS):
        raise ValueError(f"method and graph_method must be one of {GRAPH_METHODS}, "
                         f"got {method!r} and {graph_method!r}")
    source, total = _source(feature_maps, batch_size)
    opts = dict(egm_options or {})
    os_neighbours = _checks.check_positive_int(os_neighbours, "os_neighbours")

    collected = collect_regions(feature_maps, batch_size=batch_size, c=c, p=p, fs_eps=fs_eps,
                                show_progress=show_progress, egm_options=opts)
    raw, region_image, channels = collected.descriptors, collected.image, collected.descriptors.shape[1]
    region_slot, regions = collected.slot, collected.regions
    region_mass = collected.mass / np.maximum(collected.image_mass, 1e-30) if relative_mass else collected.mass
    n_images = collected.num_images

    whitening = None
    if whiten:
        dim = whitening_dim(channels, raw.shape[0], whiten_dim)
        whitening = learn_pca_whitening(raw, dim=dim, shrinkage=shrinkage)
        v = np.asarray(apply_whitening(whitening, raw))
    else:
        v = raw
    graph = normalize(region_graph(v, region_image, k, gamma=gamma, same_image_edges=same_image_edges,
                                   method=method if graph_method is None else graph_method,
                                   show_progress=show_progress))
    centrality = region_centrality(graph, alpha)
    vote = region_mass * centrality

    # ---------------------------------------------------------------- pass 2: OS maps, descriptors
    out_os, out_fs, os_regions, os_maps, fs_maps = [], [], [], [], []
    start, empty = 0, 0
    n_nb = min(os_neighbours, v.shape[0])
    for batch in progress(source(), desc="discovery pass 2: OS maps, OS.EGM descriptors", total=total,
                          enable=show_progress):
        a = check_feature_maps(batch, "a feature map batch", ndim=4)
        b, h, w, _ = a.shape
        fs = feature_saliency_map(a, fs_eps)
        u = np.asarray(_local(jnp.asarray(a), whitening)).reshape(b * h * w, -1)
        q_img = np.repeat(np.arange(start, start + b, dtype=np.int32), h * w)
        # only positions with FS mass vote (S = 0 elsewhere); they have a non-zero activation
        live = np.flatnonzero((np.asarray(fs).reshape(-1) > 0) & (np.abs(u).sum(axis=1) > 0))
        sims = np.zeros((b * h * w, n_nb), np.float32)
        idx = np.zeros((b * h * w, n_nb), np.int32)
        valid = np.zeros((b * h * w, n_nb), bool)
        if live.size:
            sims[live], idx[live], valid[live] = other_image_neighbours(
                u[live], q_img[live], v, region_image, n_nb, method=method, show_progress=False)
        shape = (b, h, w, n_nb)
        os_map = object_saliency(fs, sims.reshape(shape), vote[idx].reshape(shape), valid.reshape(shape))
        fs_desc, _ = _egm_descriptor(a, fs, whitening, c, p, opts)
        os_desc, os_reg = _egm_descriptor(a, os_map, whitening, c, p, opts)
        no_os = ~np.asarray(jnp.any(os_map > 0, axis=(-2, -1)))
        empty += int(no_os.sum())
        os_desc = np.where(no_os[:, None], np.asarray(fs_desc), np.asarray(os_desc))
        out_os.append(os_desc)
        out_fs.append(np.asarray(fs_desc))
        os_regions.append(jax.tree_util.tree_map(np.asarray, os_reg))
        if keep_maps:
            os_maps.extend(np.asarray(os_map))
            fs_maps.extend(np.asarray(fs))
        start += b
    if start != n_images:
        raise ValueError(f"the second pass over feature_maps gave {start} images, the first {n_images}: "
                         "the source must yield the same batches each time it is called")
    return Discovery(descriptors=np.concatenate(out_os).astype(np.float32),
                     fs_descriptors=np.concatenate(out_fs).astype(np.float32),
                     regions=regions, os_regions=jax.tree_util.tree_map(lambda *x: np.concatenate(x), *os_regions),
                     region_image=region_image, region_slot=region_slot, region_descriptors=v,
                     region_mass=region_mass, centrality=centrality, graph=graph, whitening=whitening,
                     os_maps=os_maps if keep_maps else None, fs_maps=fs_maps if keep_maps else None,
                     empty_os=empty)


def _egm_descriptor(a, s, whitening, c, p, opts):
    """`egm_descriptor` without the map checks: an all-zero or flat map gives no region here."""
    regions = egm_regions_traced(s, **opts)
    vectors = regional_descriptors(jnp.asarray(a), regions, c=c, p=p, whitening=whitening)
    return sum_regions(vectors, regions.valid), regions
