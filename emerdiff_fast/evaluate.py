"""`emerdiff-fast eval`: EmerDiff and the naive baseline on one benchmark, both protocols
(SPEC section 4), shardable over GPUs with torchrun (distributed.py).

1. Segment: every image once into OUT/cache/NAME.npz (EmerDiff and naive labels, mask
   embeddings, mask sizes, the preprocessed ground truth), atomic writes, so an
   interrupted run resumes and never recomputes a finished image. Under torchrun each rank
   segments its share; an unreadable sample with --skip-bad leaves NAME.bad instead, and an
   image whose segmentation fails (NaN/inf, or CUDA out of memory at the smallest chunk)
   NAME.failed, without stopping the run (both are listed in results.json).
2. Score (rank 0, after all ranks are done), from the cache alone, in two passes:
   pass 1 gathers every mask embedding (clustered into C = number of classes for the
   traditional protocol) and the dataset's concept embeddings; pass 2 scores each image:
   traditional (dataset-consistent ids, one Hungarian over the dataset; or, with
   --matching image, DiffSeg's per-image Hungarian) and the modified protocol with concept
   embeddings per image and per dataset, side by side.
OUT/run.json records the settings; a cache made with other settings is refused, naming
what differs, rather than mixed in. --open-vocab adds a naming pass and class mIoU
(evaluate_vocab.py).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .config import EmerDiffConfig
from .datasets import NUM_CLASSES, SUBSETS, SegmentationDataset
from .images import resize_labels
from .maps import naive_upsample
from .metrics import ConceptMIoU, UnsupervisedMIoU, cluster_masks
from .output import atomic_write, npz_bytes, settings_differ

log = logging.getLogger("emerdiff_fast")
CACHE_VERSION = 3  # bump when the cache entries change: an old cache is then refused (3: k-means'
# restart choice and cluster numbering)
METHODS = ("emerdiff", "naive")
# k-means of the dataset's mask embeddings (choice): k-means++, seeded with --seed, with the
# per-image k-means' restarts and iterations (10, 100).
DATASET_KMEANS = {"restarts": EmerDiffConfig.kmeans_restarts, "max_iter": EmerDiffConfig.kmeans_iterations}


def add_parser(sub, formatter_class=None) -> None:
    from .commands.common import add_model_args, positive_int

    p = sub.add_parser("eval", help="evaluate on a benchmark (mIoU, both protocols)", formatter_class=formatter_class)
    p.add_argument("--dataset", required=True, choices=list(NUM_CLASSES))
    p.add_argument("--root", required=True, help="dataset root in its standard layout (docs/evaluation.md)")
    p.add_argument("--subset", choices=SUBSETS, default="full",
                   help="COCO-Stuff: the full val2017 set (the paper's Table 1) or STEGO's curated list")
    p.add_argument("--limit", type=positive_int, default=None, help="first N validation images only")
    p.add_argument("--out", default="eval-out",
                   help="folder for the cache and results.json; a rerun with the same settings resumes")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run in --out made with other settings")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable samples (listed in results.json) instead of stopping")
    p.add_argument("--matching", choices=["dataset", "image"], default="dataset",
                   help="traditional protocol: mask embeddings clustered over the dataset, then one Hungarian "
                        "(STEGO/PiCIE), or a Hungarian per image (DiffSeg, more lenient)")
    p.add_argument("--open-vocab", action="store_true",
                   help="also name the segments with the data set's class names (label heat maps from the "
                        "model's cross-attention) and score class mIoU beside two baselines (evaluate_vocab.py)")
    p.add_argument("--class-names", metavar="FILE", default=None,
                   help="with --open-vocab: class names one per line in class-id order (default: the shipped "
                        "list for ade20k, cocostuff171, pascal_context59/459 and shapes)")
    p.add_argument("--class-map-dir", metavar="DIR", default=None,
                   help="with --open-vocab: an external segmenter's predictions in the data set's class ids, "
                        "DIR/NAME.npz (class_map) or DIR/NAME.png, scored alone and combined with the segments "
                        "(the paper's overlap rule)")
    p.add_argument("--draw-batch", type=positive_int, default=None, metavar="N",
                   help="with --open-vocab: noise draws per heat-map UNet call (default: all 4; each call holds "
                        "draws x prompts images, 84 for PASCAL-Context-459: 1 bounds it to 21)")
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def _settings(args) -> dict:
    keys = ("dataset", "subset", "model", "random_init", "dtype", "backend", "masks", "lam", "seed", "resolution",
            "keep_aspect", "feature_samples", "preset", "limit")
    # model_settings: what the model's emerdiff.json sets beyond the options (e.g. the mini
    # model's t_modulate), so a cache made before the model's settings changed is refused too
    return {**{k: getattr(args, k) for k in keys}, "model_settings": args.model_settings,
            "cache_version": CACHE_VERSION}


def check_run(out: Path, settings: dict, overwrite: bool = False) -> None:
    """A cache made with other settings is never mixed in: refused, naming what differs,
    or with `overwrite` deleted. Same settings: resume."""
    diff = settings_differ(out / "run.json", settings)
    if diff is None:
        return
    if not overwrite:
        raise ValueError(f"{out} holds a run with other settings ({diff}); use another --out or --overwrite")
    shutil.rmtree(out / "cache", ignore_errors=True)
    for name in ("run.json", "results.json", "vocab.json"):
        (out / name).unlink(missing_ok=True)


def start_run(out: Path, settings: dict, overwrite: bool = False) -> None:
    check_run(out, settings, overwrite)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    atomic_write(out / "run.json", json.dumps(settings, indent=1).encode())


def _predict(seg, sample) -> dict:
    # an array, not the PIL image: data set pixels are used in their stored orientation
    r = seg(np.asarray(sample.image))
    h, w = sample.label.shape
    k = seg.config.num_masks
    low = torch.from_numpy(r.low_res_labels).long()
    naive = naive_upsample(low, k, seg.processing_size(sample.image.size))
    return {"emerdiff": r.labels, "naive": resize_labels(naive, (h, w)).numpy().astype(np.int32),
            "embeddings": r.mask_embeddings, "sizes": np.bincount(low.flatten().numpy(), minlength=k),
            "gt": sample.label.astype(np.uint16)}


def segment_dataset(seg, dataset: SegmentationDataset, cache: Path, indices: list[int], *, skip_bad: bool = False,
                    progress: bool = True, desc: str = "segment") -> int:
    """Segment the given images into the cache, skipping finished ones; returns how many
    were computed now."""
    from tqdm import tqdm

    from .datasets import DatasetError
    from .images import ImageError

    computed = 0
    for i in tqdm(indices, desc=desc, unit="img", disable=not progress):
        name = dataset.items[i][0]
        if any((cache / f"{name}{suffix}").exists() for suffix in (".npz", ".bad", ".failed")):
            continue
        try:
            sample = dataset[i]
        except (DatasetError, ImageError) as exc:
            if not skip_bad:
                raise DatasetError(f"{exc} (--skip-bad skips unreadable samples)") from None
            log.warning("skipped: %s", exc)
            atomic_write(cache / f"{name}.bad", str(exc).encode())
            continue
        try:
            prediction = _predict(seg, sample)
        except (FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
            # one image that overflows, or still runs out of memory at the smallest chunk, must
            # not end a multi-hour run: logged, skipped and listed in results.json
            log.error("%s: %s; skipped", name, str(exc).splitlines()[0])
            atomic_write(cache / f"{name}.failed", f"{type(exc).__name__}: {exc}".encode())
            continue
        atomic_write(cache / f"{name}.npz", npz_bytes(prediction))
        computed += 1
    return computed


def _cached(cache: Path, names: list[str]):
    missing = [n for n in names if not (cache / f"{n}.npz").exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} images are not in {cache} (first: {missing[0]}); did a rank fail?")
    for n in names:
        with np.load(cache / f"{n}.npz") as f:
            yield dict(f)


def score(dataset: SegmentationDataset, cache: Path, *, matching: str = "dataset", seed: int = 0,
          device="cpu", progress: bool = True) -> dict:
    """Both protocols from the cache, in two passes (module docstring)."""
    from tqdm import tqdm

    names = [item[0] for item in dataset.items]
    bad = [n for n in names if (cache / f"{n}.bad").exists()]
    failed = [n for n in names if (cache / f"{n}.failed").exists()]
    good = [n for n in names if n not in set(bad) | set(failed)]
    if not good:
        raise RuntimeError("no image could be scored")
    methods = [m for m in METHODS if m in np.load(cache / f"{good[0]}.npz").files]
    c, ignore = dataset.num_classes, dataset.ignore_index
    trad = {m: UnsupervisedMIoU(c, ignore, matching=matching) for m in methods}
    mod = {(m, v): ConceptMIoU(c, ignore, concepts=v) for m in methods for v in ("image", "dataset")}

    embeddings, sizes = [], []
    for entry in tqdm(_cached(cache, good), total=len(good), desc="score: pass 1", disable=not progress):
        embeddings.append(entry["embeddings"])
        sizes.append(entry["sizes"])
        for m in methods:
            mod[m, "dataset"].add(entry[m], entry["embeddings"], entry["gt"])
    clusters = None
    if matching == "dataset":
        clusters = cluster_masks(embeddings, sizes, c, seed=seed, device=device, **DATASET_KMEANS)
        if clusters.num_clusters < c:
            log.warning("only %d non-empty masks for %d classes: %d clusters (not comparable to a full run)",
                        clusters.num_clusters, c, clusters.num_clusters)
    del embeddings
    for j, entry in enumerate(tqdm(_cached(cache, good), total=len(good), desc="score: pass 2",
                                   disable=not progress)):
        for m in methods:
            pred = entry[m] if clusters is None else clusters.ids[j][entry[m]]
            trad[m].update(pred, entry["gt"])
            for v in ("image", "dataset"):
                mod[m, v].update(entry[m], entry["embeddings"], entry["gt"])

    results = {
        "dataset": dataset.name, "subset": dataset.subset if dataset.name.startswith("cocostuff") else None,
        "images": len(good), "skipped_unreadable": bad, "skipped_failed": failed,
        "protocols": {
            "traditional": {
                "matching": matching,
                "description": ("mask embeddings of all images clustered into C dataset clusters (k-means), "
                                "then one Hungarian assignment on the dataset confusion matrix (STEGO/PiCIE)"
                                if matching == "dataset" else
                                "Hungarian assignment per image on the raw per-image k-means ids (DiffSeg; "
                                "lenient, not the paper's Table 1 protocol)"),
                "clusters": None if clusters is None else clusters.num_clusters,
                "kmeans": None if clusters is None else {**DATASET_KMEANS, "seed": seed}},
            "modified": {"concepts": ["image", "dataset"],
                         "description": "each pixel labelled by its most cosine-similar class concept embedding "
                                        "(mean mask embedding of the class's pixels), concepts from each image "
                                        "and from the whole dataset"}},
    }
    for m in methods:
        results[m] = {"traditional": trad[m].compute().to_dict(),
                      "modified_image_concepts": mod[m, "image"].compute().to_dict(),
                      "modified_dataset_concepts": mod[m, "dataset"].compute().to_dict()}
    return results


def _commit() -> str | None:
    """The git commit of this checkout ("-dirty" with uncommitted changes), if it is one
    (an installed wheel has none)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def format_table(results: dict) -> str:
    """Every column says what it is, so no number reads as a paper's table when it is not."""
    trad = results["protocols"]["traditional"]
    trad_name = ("traditional: dataset clusters + one Hungarian" if trad["matching"] == "dataset"
                 else "traditional: per-image Hungarian (lenient)")
    s = results["settings"]
    caveats = []
    if results.get("subset") == "curated":
        caveats.append("curated subset, the paper's Table 1 uses the full set")
    if s.get("limit"):
        caveats.append(f"first {s['limit']} images only")
    if s.get("model") == "tiny" or s.get("random_init"):
        caveats.append("random weights: meaningless numbers")
    if trad["matching"] == "image":
        caveats.append("per-image matching is not the paper's protocol")
    head = (f"{results['dataset']}{' (' + results['subset'] + ')' if results.get('subset') else ''}, "
            f"{results['images']} images, K={s['masks']}, model={s['model']}, {s['dtype']}, backend={s['backend']}"
            + (f"; note: {'; '.join(caveats)}" if caveats else ""))
    rows = [head, "",
            f"| method | {trad_name}: mIoU | pixel acc. | modified, per-image concepts: mIoU | pixel acc. "
            "| modified, dataset concepts: mIoU | pixel acc. |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in METHODS:
        if m in results:
            r = results[m]
            cells = [r[k][f] for k in ("traditional", "modified_image_concepts", "modified_dataset_concepts")
                     for f in ("miou", "pixel_accuracy")]
            rows.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    return "\n".join(rows)


def cmd_eval(args) -> int:
    from .commands.common import removed_if_unused

    # a run that fails before any output leaves no folder (run.json and vocab.json are written first)
    with removed_if_unused(Path(args.out), bookkeeping=("run.json", "vocab.json")):
        return _eval(args)


def _eval(args) -> int:
    from . import distributed
    from .commands.common import (UsageError, build_segmenter, build_vocabulary, check_device, check_out_dir,
                                  resolve_model_args)
    from .datasets import DatasetError, class_names
    from .evaluate_vocab import (check_class_maps, format_open_vocab_table, name_dataset, score_open_vocab, start_naming,
                                 vocab_settings)
    from .images import set_max_pixels
    from .vocabulary import VocabularyConfig

    set_max_pixels(args.max_pixels)
    resolve_model_args(args)
    shard = distributed.from_env(args.device)
    args.device = shard.device(args.device)
    out = Path(args.out)
    settings = _settings(args)
    if not args.open_vocab and (args.class_names or args.class_map_dir or args.draw_batch):
        raise UsageError("--class-names, --class-map-dir and --draw-batch apply with --open-vocab only")
    vocab_config = VocabularyConfig(draw_batch=args.draw_batch)
    with shard.checked(UsageError, DatasetError, ValueError, raise_as=UsageError):
        dataset = SegmentationDataset(args.dataset, args.root, args.limit, args.subset)
        names = class_names(args.dataset, args.class_names) if args.open_vocab else None
        if args.class_map_dir is not None:
            check_class_maps(Path(args.class_map_dir), [item[0] for item in dataset.items])
        check_device(args.device)
        if shard.is_main:  # one rank prepares the folder; the others learn its verdict
            check_out_dir(out)
            start_run(out, settings, overwrite=args.overwrite)
            if names is not None:
                start_naming(out, vocab_settings(names, vocab_config), overwrite=args.overwrite)
    seg = build_segmenter(args, progress=False)
    indices = shard.take(list(range(len(dataset))))
    try:
        segment_dataset(seg, dataset, out / "cache", indices, skip_bad=args.skip_bad, progress=not args.quiet,
                        desc=f"{shard.log_prefix()}eval {dataset.name}")
        if names is not None:
            name_dataset(build_vocabulary(names, seg, vocab_config), dataset, out / "cache", indices,
                         seg.config.num_masks, progress=not args.quiet, desc=f"{shard.log_prefix()}name {dataset.name}")
    except KeyboardInterrupt:
        cached = len(list((out / "cache").glob("*.npz")))
        print(f"{shard.log_prefix()}interrupted: {cached} of {len(dataset)} images cached in {out / 'cache'}; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    shard.barrier()  # every rank's share is in the cache
    if not shard.is_main:
        distributed.finish(shard)
        return 0
    results = {"settings": settings, "commit": _commit(),
               **score(dataset, out / "cache", matching=args.matching, seed=args.seed, device=args.device,
                       progress=not args.quiet)}
    if names is not None:
        results["open_vocab"] = score_open_vocab(dataset, out / "cache", names, seg.config.num_masks,
                                                 class_map_dir=args.class_map_dir, progress=not args.quiet)
    atomic_write(out / "results.json", json.dumps(results, indent=1).encode())
    print(format_table(results))
    if names is not None:
        print(format_open_vocab_table(results["open_vocab"]))
    print(f"wrote {out / 'results.json'}")
    distributed.finish(shard)
    return 0
