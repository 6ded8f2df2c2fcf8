"""Resume a checkpoint under another layout: data-parallel size, pipeline stages,
tensor-parallel size or ZeRO stage (0 in fp32, 1, 2, 3 into each other).

DeepSpeed writes, per (pipeline stage, tensor slice, data-parallel rank), one file with that
rank's flat fp32 partition of the master weights and of Adam's two moments. ZeRO-1/2 record
for every parameter the fragment of the partition it owns (`param_slice_mappings`, by the
engine's parameter name); ZeRO-3 splits every parameter evenly over the data ranks, in the
order of the model file's `param_shapes`; without ZeRO (fp32) the model file holds the
whole weights and torch's optimizer state, keyed by position. DeepSpeed reloads those files
only under the layout that wrote them. So each save also records, per rank, its `rank_map`:
which files it wrote, its data and tensor rank, and for every trainable parameter the plain
model's name and the dimension its tensor slice was cut along. A resume under another
layout (`load`):

1. assembles each trainable parameter's full fp32 weight and moments: the fragments of the
   data-parallel ranks concatenated in rank order give one tensor slice; tensor slices are
   joined along their split dimension (replicated parameters are taken from tensor rank 0);
2. cuts this rank's tensor slice and writes it into this rank's fragments through
   DeepSpeed's tensor-fragment API (`safe_set_full_*`, any ZeRO stage; without ZeRO into
   torch's optimizer state), and into the module's (bit16) parameter;
3. sets Adam's step count, the optimizer groups' settings (by group name), the scheduler and
   the engine's step counters from the saved files.

Nothing is recomputed or rounded: the resumed weights and moments equal the saved ones
bitwise (tested); what differs afterwards is only the order of floating-point reductions
(data-parallel sums, tensor-parallel partial products). Files are opened memory-mapped, so
a rank reads the pages of the parameters it holds, not every file whole.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("qwenvl_train")

RANK_MAP = "rank_map"  # key of the per-rank trainer file that holds `rank_map(...)`
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state per parameter
STATE_KEYS = ("fp32", *MOMENTS)
RELAYOUT_ZERO_STAGES = (1, 2, 3)  # the partition formats read and written here
LAYOUT_KEYS = ("world_size", "pp", "tp", "dp", "zero_stage")  # of elastic.layout_of


class RelayoutError(RuntimeError):
    """A checkpoint whose files do not hold what the resume under the new layout needs."""


def describe(layout: dict | None) -> str:
    if not layout:
        return "unknown"
    return (f"pp={layout['pp']} x tp={layout['tp']} x dp={layout['dp']}, "
            f"ZeRO-{layout['zero_stage']}")


def readable(zero_stage: int, bf16_or_fp16: bool) -> bool:
    """Whether a run's checkpoint files are read (and its engine written) here: every ZeRO
    stage, except DeepSpeed's bf16/fp16 wrappers without ZeRO (their own flat format)."""
    return zero_stage in RELAYOUT_ZERO_STAGES or not bf16_or_fp16


def supports(engine) -> bool:
    return readable(engine.zero_optimization_stage(),
                    engine.bfloat16_enabled() or engine.fp16_enabled())


def needed(saved: dict | None, now: dict | None) -> bool:
    """A resume from layout `saved` into `now` (elastic.layout_of) that DeepSpeed's own
    loader cannot do: another pp, tp or ZeRO stage, or another dp size under ZeRO >= 1
    (ZeRO-0's whole optimizer state reloads under any dp size)."""
    if not saved or not now or not (saved.get("rank_maps") and now.get("rank_maps")):
        return False
    if any(saved[k] != now[k] for k in ("pp", "tp", "zero_stage")):
        return True
    return saved["dp"] != now["dp"] and now["zero_stage"] > 0


def trainable_params(par) -> list[tuple[str, str, nn.Parameter]]:
    """(engine name, plain-model name, parameter) of this rank's trainable parameters;
    pipeline anchors (no plain-model counterpart) are left out."""
    from qwenvl_train.training.parallel import pipeline

    out = []
    for name, param in par.module.named_parameters():
        if not param.requires_grad:
            continue
        original = pipeline.original_name(par.module, name) if par.is_pipeline else name
        if original is not None:
            out.append((name, original, param))
    return out


def _split_dim(param: nn.Parameter) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def rank_map(engine, par) -> dict[str, Any]:
    """What a later resume under another layout needs to know of this rank's files."""
    stage = int(engine.zero_optimization_stage())
    params = {name: [original, _split_dim(p)] for name, original, p in trainable_params(par)}
    model_file = Path(engine._get_ckpt_name("", "")).name
    common = {"model_file": model_file, "zero_stage": stage, "tp_size": int(par.sizes.tp),
              "tp_rank": int(par.grid.get_slice_parallel_rank())}
    if stage == 0:
        # One torch optimizer over whole tensors, saved in the model file of data rank 0
        # (the other data ranks hold copies); its state is keyed by position.
        name_of = {id(p): name for name, p in par.module.named_parameters()}
        order = [name_of[id(p)] for g in engine.optimizer.param_groups for p in g["params"]]
        return {**common, "zero_file": model_file, "dp_rank": int(par.dp_rank),
                "order": order, "params": params if par.dp_rank == 0 else {}}
    # the data rank in DeepSpeed's file names: within the optimizer's partition group
    return {**common, "zero_file": Path(engine._get_zero_ckpt_name("", "")).name,
            "dp_rank": int(dist.get_rank(group=engine.optimizer.dp_process_group)),
            "params": params}


class SavedState:
    """Full fp32 weights and Adam moments of every trainable parameter of a checkpoint
    directory, assembled on demand from its files (any ZeRO stage; fp32 without ZeRO)."""

    def __init__(self, step_dir: Path, rank_maps: list[dict]) -> None:
        self.dir = step_dir
        # ZeRO-0: data ranks > 0 name the same file with no parameters; keep the holder's map
        self._maps = {m["zero_file"]: m for m in sorted(rank_maps, key=lambda m: bool(m["params"]))}
        self._files: dict[str, dict] = {}  # a rank's file, normalised (_optimizer_state)
        self._loaded: dict[str, Any] = {}  # each file unpickled once (memory-mapped)
        # plain name -> tensor rank -> [(data rank, file, engine name)]; split dim, tp size
        self.pieces: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
        self.split: dict[str, tuple[int | None, int]] = {}
        for m in rank_maps:
            for name, (original, dim) in m["params"].items():
                self.pieces[original][m["tp_rank"]].append((m["dp_rank"], m["zero_file"], name))
                self.split[original] = (dim, m["tp_size"])

    @classmethod
    def open(cls, step_dir: Path) -> SavedState:
        maps = []
        for path in sorted(step_dir.glob("trainer_rank*.pt")):
            saved = torch.load(path, weights_only=False, map_location="cpu").get(RANK_MAP)
            if saved is None:
                raise RelayoutError(f"{path} records no parameter map (written before "
                                    "resumes across layouts); resume with its layout")
            maps.append(saved)
        if not maps:
            raise RelayoutError(f"{step_dir} has no trainer_rank*.pt files")
        return cls(step_dir, maps)

    def names(self) -> set[str]:
        return set(self.pieces)

    def _optimizer_state(self, file: str) -> dict:
        """One rank's file as {fp32: {group: flat}, state: {group: Adam state (flat)},
        param_groups, where: {engine name: (group, start, numel)}}: its fragment of each
        parameter it holds, whatever the ZeRO stage that wrote it."""
        if file not in self._files:
            rank_map = self._maps[file]
            if rank_map["zero_stage"] == 0:
                self._files[file] = self._zero0(rank_map)
            else:
                sd = self._load(file)["optimizer_state_dict"]
                self._files[file] = (self._zero3(sd, rank_map) if "fp32_flat_groups" in sd
                                     else self._zero12(sd, file))
        return self._files[file]

    def _zero12(self, sd: dict, file: str) -> dict:
        """ZeRO-1/2 (and DeepSpeed's bf16 optimizer): each parameter's fragment of this
        rank's flat partition, by engine name, in `param_slice_mappings`."""
        base = sd.get("base_optimizer_state")
        if not isinstance(base, dict):
            raise RelayoutError(f"{self.dir / file}: an elastic ZeRO checkpoint (DeepSpeed "
                                "elastic_checkpoint=true) is not read here")
        return {"fp32": dict(enumerate(sd["single_partition_of_fp32_groups"])),
                "state": base["state"], "param_groups": base["param_groups"],
                "where": {name: (g, a.start, a.numel)
                          for g, mapping in enumerate(sd["param_slice_mappings"])
                          for name, a in mapping.items()}}

    def _zero0(self, rank_map: dict) -> dict:
        """ZeRO-0 (fp32): the module's tensors are the master weights; the torch optimizer's
        state is keyed by position in its groups, which `order` names."""
        states = self._load(rank_map["model_file"])
        module, optim = states.get("module"), states.get("optimizer")
        if module is None or optim is None:
            raise RelayoutError(f"{self.dir / rank_map['model_file']} holds no module or "
                                "optimizer state")
        ids = [i for g in optim["param_groups"] for i in g["params"]]
        where, fp32 = {}, {}
        for i, name in zip(ids, rank_map["order"], strict=True):
            if name in rank_map["params"]:
                fp32[i] = module[name].reshape(-1)
                where[name] = (i, 0, fp32[i].numel())
        state = {i: {k: v if k == "step" else v.reshape(-1) for k, v in st.items()}
                 for i, st in optim["state"].items()}  # flat, as the other formats' moments
        return {"fp32": fp32, "state": state, "param_groups": optim["param_groups"],
                "where": where}

    def _zero3(self, sd: dict, rank_map: dict) -> dict:
        """ZeRO-3 splits every parameter evenly over the data ranks (the last part padded)
        and concatenates this rank's parts in the order of the model file's param_shapes."""
        shapes = self._load(rank_map["model_file"])["param_shapes"]
        ranks, rank = int(sd["partition_count"]), rank_map["dp_rank"]
        where = {}
        for g, group in enumerate(shapes):
            offset = 0
            for name, shape in group.items():
                numel = torch.Size(shape).numel()
                part = -(-numel // ranks)
                where[name] = (g, offset, max(0, min(part, numel - rank * part)))
                offset += part
        base = sd["optimizer_state_dict"]
        return {"fp32": dict(enumerate(sd["fp32_flat_groups"])), "state": base["state"],
                "param_groups": base["param_groups"], "where": where}

    def _fragment(self, file: str, name: str, key: str) -> torch.Tensor:
        entry = self._optimizer_state(file)
        g, start, numel = entry["where"][name]
        flat = entry["fp32"][g] if key == "fp32" else entry["state"][g][key]
        return flat.narrow(0, start, numel)

    def full(self, original: str, shape: torch.Size) -> dict[str, torch.Tensor]:
        """The full fp32 weight and moments of parameter `original`, whose full shape is
        `shape` (the plain model's)."""
        if original not in self.pieces:
            raise RelayoutError(f"{self.dir} holds no state for {original}")
        dim, tp = self.split[original]
        slices = sorted(self.pieces[original].items())
        if dim is None:
            slices = slices[:1]  # replicated: every tensor rank holds the same values
        slice_shape = list(shape)
        if dim is not None:
            slice_shape[dim] //= tp
        out = {}
        for key in STATE_KEYS:
            parts = []
            for _, pieces in slices:
                # a parameter has a fragment in the files of the data ranks it overlaps
                flat = torch.cat([self._fragment(file, name, key)
                                  for _, file, name in sorted(pieces)
                                  if name in self._optimizer_state(file)["where"]])
                if flat.numel() != torch.Size(slice_shape).numel():
                    raise RelayoutError(f"{self.dir}: {original} has {flat.numel()} values in "
                                        f"its files, the model expects {slice_shape}")
                parts.append(flat.view(slice_shape))
            out[key] = torch.cat(parts, dim=dim) if dim is not None else parts[0]
        return out

    def step(self) -> torch.Tensor:
        """Adam's step count (the same in every group and file)."""
        states = [s for file in sorted(self._all_files())
                  for s in self._optimizer_state(file)["state"].values()]
        steps = {float(s["step"]) for s in states}
        if len(steps) != 1:
            raise RelayoutError(f"{self.dir}: Adam step counts differ between groups: {steps}")
        return states[0]["step"].clone()

    def group_settings(self) -> dict[str, dict]:
        """Optimizer group settings (lr, weight decay, ...) by group name."""
        out: dict[str, dict] = {}
        for entry in (self._optimizer_state(f) for f in sorted(self._all_files())):
            for group in entry["param_groups"]:
                out.setdefault(group["name"], {k: v for k, v in group.items() if k != "params"})
        return out

    def _all_files(self) -> set[str]:
        return {file for per_tp in self.pieces.values() for pieces in per_tp.values()
                for _, file, _ in pieces}

    def model_states(self) -> dict:
        """Counters and scheduler of the DeepSpeed model-state file (identical on every
        model-parallel rank)."""
        return self._load(min(m["model_file"] for m in self._maps.values()))

    def _load(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = torch.load(self.dir / name, mmap=True, weights_only=False,
                                            map_location="cpu")
        return self._loaded[name]


def _init_adam_state(adam: torch.optim.Optimizer, flats: list[torch.Tensor],
                     step: torch.Tensor) -> None:
    """Adam's state of each flat fp32 partition as its first step would create it (torch
    creates it lazily; the fragments written next need somewhere to go), at the saved step."""
    groups = adam.param_groups
    if any(g.get("amsgrad") for g in groups):
        raise RelayoutError("optimizer amsgrad=True is not re-partitioned")
    on_device = any(g.get("fused") or g.get("capturable") for g in groups)
    for p in flats:
        state = adam.state[p]
        state["step"] = step.to(device=p.device if on_device else "cpu",
                                dtype=torch.float32).clone()
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))


def _refresh_zero3_bit16(optimizer) -> None:
    """ZeRO-3 keeps this rank's parts of the (bit16) model parameters in one flat tensor per
    sub-group, apart from the fp32 partitions just written: copy those in and point the
    parameters' parts at it (as DeepSpeed's own universal-checkpoint load finishes)."""
    for g, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
        flat = optimizer.fp16_partitioned_groups_flat[g]
        parts = optimizer.fp16_partitioned_groups[g]
        if fp32.numel():
            flat.data.copy_(fp32.data)
        for part, view in zip(parts, optimizer.unflatten(flat, parts), strict=True):
            part.data = view.data


def _full_shape(param: nn.Parameter, tp: int) -> torch.Size:
    # ZeRO-3 parameters are empty outside a forward; ds_shape is their (tensor slice) shape
    shape, dim = list(getattr(param, "ds_shape", param.shape)), _split_dim(param)
    if dim is not None:
        shape[dim] *= tp
    return torch.Size(shape)


@torch.no_grad()
def load(engine, par, step_dir: Path) -> None:
    """Load checkpoint `step_dir` (any layout `readable` allows) into this run's engine (any
    such layout). Every rank calls it; the only collective is one name check (the fragment
    writes are local)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = SavedState.open(step_dir)
    mine = trainable_params(par)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(original for _, original, _ in mine))
    now = set().union(*everyone)
    if now != saved.names():
        missing, extra = sorted(now - saved.names()), sorted(saved.names() - now)
        raise RelayoutError(
            f"{step_dir} was saved training other tensors than this run trains: this run "
            f"also trains {missing[:4]}, the checkpoint also has {extra[:4]}")
    optimizer = engine.optimizer
    step, settings = saved.step(), saved.group_settings()
    stage = engine.zero_optimization_stage()
    zero3 = stage == 3
    base = optimizer if stage == 0 else optimizer.optimizer  # the torch optimizer
    # ZeRO-3 hands its base optimizer one sub-group's partition at a time (groups hold no
    # params between steps); ZeRO-1/2 keep one partition per group in it; ZeRO-0 the params.
    flats = (optimizer.fp32_partitioned_groups_flat if zero3 else
             [p for g in base.param_groups for p in g["params"]])
    _init_adam_state(base, flats, step)
    if stage in (1, 2):  # link Adam's moments to the parameters' fragments
        optimizer._lazy_init_hp_params_optimizer_state()
    tp, tp_rank = par.sizes.tp, par.grid.get_slice_parallel_rank()
    for _, original, param in mine:
        full = saved.full(original, _full_shape(param, tp))
        dim = _split_dim(param)
        local = {k: (v.chunk(tp, dim=dim)[tp_rank] if dim is not None else v).contiguous()
                 for k, v in full.items()}
        if stage == 0:  # fp32: the parameter is the master weight
            for key in MOMENTS:
                base.state[param][key].copy_(local[key])
        else:
            safe_set_full_fp32_param(param, local["fp32"])
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, local[key], key)
        if not zero3:
            param.data.copy_(local["fp32"].to(param.dtype))
    if zero3:
        _refresh_zero3_bit16(optimizer)
    for group in base.param_groups:
        if group.get("name") not in settings:
            raise RelayoutError(f"{step_dir} has no optimizer group {group.get('name')!r}")
        group.update({k: v for k, v in settings[group["name"]].items() if k != "params"})
    states = saved.model_states()
    engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps = states["global_steps"]
    engine.global_samples = states["global_samples"]
    engine.skipped_steps = states["skipped_steps"]
    if dist.get_rank() == 0:
        log.info("resumed %s under a new layout: %d trainable tensors re-partitioned",
                 step_dir.name, len(now))
