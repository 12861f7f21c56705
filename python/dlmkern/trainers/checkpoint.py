"""Checkpoints shared by every trainer: model, value model and optimizers through
torch.distributed.checkpoint (sharded when training on several ranks, loadable on any number of
ranks), RNG states, the trainer's own progress (step, data position, ...) and a Hugging Face
export of the model, written atomically. A run keeps its last `keep_last` periodic checkpoints
(and `final`), with or without the optimizer state (`save_optimizer`), and checks before it
trains that the disk holds as many as will exist at once (`checkpoint_bytes`)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch

from dlmkern import distributed
from dlmkern._host import HOST
from dlmkern.trainers.checks import _CKPT
from dlmkern.trainers.config import to_dict
from dlmkern.trainers.optim import _FP32_STATE, _LOW

GIB = 2**30


class Checkpointing:
    """Mixin. The trainer provides ``model``, ``opt``, ``cfg``, optionally ``value_model`` /
    ``value_opt`` and ``ref_model``, and ``_progress()`` / ``_set_progress(dict)`` for its own
    counters."""

    value_model = None
    value_opt = None
    # how to continue a run a signal stopped, named in its last line: f(checkpoint) -> text
    # (dlmkern train sets its command line; None: the Python API's keys)
    resume_command = None

    def _progress(self) -> dict:
        raise NotImplementedError

    def _set_progress(self, meta: dict) -> None:
        raise NotImplementedError

    def save(self, path: str):
        """Writes a checkpoint directory: dcp/ (model, value model, optimizers unless
        save_optimizer is off), model/ (Hugging Face export; with LoRA the merged weights, and
        adapter/ the adapters in PEFT's format), trainer_state.pt (progress and RNG
        states), trainer_config.json. A temporary directory is renamed into place, so a crash
        never leaves a half-written checkpoint."""
        import torch.distributed.checkpoint as dcp

        tmp = path.rstrip("/") + ".tmp"
        if distributed.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        distributed.barrier()
        with _quiet_dcp():
            dcp.save(self._state(optim=self.cfg.save_optimizer),
                     checkpoint_id=os.path.join(tmp, "dcp"))
        full = full_state(self.model)  # collective: every rank takes part
        if distributed.rank() == 0:
            _export(self.model, full, tmp)
            tok = getattr(self, "tok", None)
            if hasattr(tok, "save_pretrained"):  # a Hugging Face tokenizer: model/ is loadable
                tok.save_pretrained(os.path.join(tmp, "model"))
            torch.save({**self._progress(), **_rng_states()},
                       os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "trainer_config.json"), "w") as f:
                json.dump(to_dict(self.cfg), f, indent=2)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        distributed.barrier()

    def resume(self, path: str):
        """Restores a checkpoint written by save(), on any number of ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        saved = dcp.FileSystemReader(os.path.join(path, "dcp")).read_metadata()
        with_optim = any(k.startswith("optim.") for k in saved.state_dict_metadata)
        if not with_optim:
            warnings.warn(f"{path}: the checkpoint holds no optimizer state (save_optimizer: "
                          "false); the optimizers start fresh (moments from zero, fp32 masters "
                          "from the weights)", RuntimeWarning, stacklevel=2)
        state = self._state(optim=with_optim)
        # Optimizer entries of parameters that never had a gradient (the value model's unused
        # lm_head) are absent from a checkpoint but present in a fresh template: allow that.
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=os.path.join(path, "dcp"),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
        _set_models(state, [("model", self.model, self.opt),
                            ("value_model", self.value_model, self.value_opt)])
        if getattr(self, "ref_model", None) is not None:
            if any(k.startswith("ref_model.") for k in saved.state_dict_metadata):
                set_model_state_dict(self.ref_model, state["ref_model"])
            else:
                warnings.warn(f"{path}: the checkpoint holds no KL reference model (written by "
                              "an older dlmkern); the reference stays the model this trainer "
                              "was built with", RuntimeWarning, stacklevel=2)
        meta = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False,
                          map_location=HOST)
        self._set_progress(meta)
        _set_rng_states(meta)
        logger = getattr(self, "logger", None)
        if logger is not None:  # rows a previous run logged after this checkpoint come again
            logger.truncate(self.step)
        return self

    def _state(self, optim: bool = True) -> dict:
        """The dcp state: models (policy, value model, KL reference) and, with `optim`, the
        optimizers (key "<model>_optim" beside each: "optim" for the policy's)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        state = {}
        for name, model, opt in (("model", self.model, self.opt),
                                 ("value_model", self.value_model, self.value_opt)):
            if model is None:
                continue
            if optim:
                state[name], state[_OPTIM_KEY[name]] = get_state_dict(model, opt)
            else:
                state[name] = get_model_state_dict(model)
        if getattr(self, "ref_model", None) is not None:  # the frozen KL reference, too: a
            # resumed run must not take its current policy as the reference
            state["ref_model"] = get_model_state_dict(self.ref_model)
        return state

    def save_periodic(self) -> str:
        """output_dir/checkpoint-<step>, then the periodic checkpoints beyond keep_last
        deleted (oldest first; final and later steps are never touched)."""
        out = self.cfg.output_dir
        path = os.path.join(out, f"checkpoint-{self.step}")
        self.save(path)
        if distributed.rank() == 0:
            for old in stale_checkpoints(out, self.step, self.cfg.keep_last):
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return path

    def run_steps(self, name: str, after_step=None) -> None:
        """The training loop of every trainer: from self.step to total_steps, each step shown on
        the progress line (and passed to ``after_step(log)``), a periodic checkpoint every
        save_every steps, output_dir/final at the end, then the curves (``finish_logs``). Ctrl-C
        (SIGINT), SIGTERM or SIGUSR1 on any rank: the step finishes, checkpoint-<step> and the
        curves are written and trainers.preemption.Preempted is raised (a SystemExit: status 0,
        130 after Ctrl-C)."""
        from dlmkern.evaluate import require_held_out
        from dlmkern.trainers.logging import progress, show_step
        from dlmkern.trainers.preemption import PreemptionWatch

        self.check_checkpoint_disk()  # before the first step, not at the first save
        require_held_out(self.cfg.eval_every, self.eval_fn)
        steps = progress(range(self.step, self.cfg.total_steps), self.cfg.progress_bar, name)
        with PreemptionWatch() as watch:
            for _ in steps:
                log = self.train_step()
                show_step(steps, log)
                if after_step is not None:
                    after_step(log)
                saved = None
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    saved = self.save_periodic()  # and deletes those beyond keep_last
                if watch.requested():  # one collective per step: the ranks agree
                    watch.stop(self, saved)
            self.save(os.path.join(self.cfg.output_dir, "final"))  # a signal now: ignored
        self.finish_logs()

    def check_checkpoint_disk(self) -> None:
        """Before training: refuses a run whose checkpoints (as many as will exist at once,
        keep_last) do not fit in output_dir's free space, naming the bytes and the settings."""
        cfg = self.cfg
        per = checkpoint_bytes(self.model, self.value_model, getattr(self, "ref_model", None),
                               save_optimizer=cfg.save_optimizer)
        se = cfg.save_every
        saves = cfg.total_steps // se - self.step // se if se else 0
        existing = len(periodic_checkpoints(cfg.output_dir))
        copies = checkpoints_at_once(cfg.keep_last, max(saves, 0), existing)
        need = copies * per
        # rank 0 decides (it alone writes output_dir, and may not have made it yet elsewhere)
        free = shutil.disk_usage(cfg.output_dir).free if distributed.rank() == 0 else 0
        short = distributed.all_sum(int(distributed.rank() == 0 and need > free))
        if short:
            lean = checkpoint_bytes(self.model, self.value_model,
                                    getattr(self, "ref_model", None), save_optimizer=False)
            raise ValueError(
                f"output_dir {cfg.output_dir!r}: checkpoints need {need / GIB:.2f} GiB "
                f"({copies} x {per / GIB:.2f} GiB: keep_last={cfg.keep_last} periodic ones and "
                f"the one being written) but the disk has {free / GIB:.2f} GiB free; set "
                f"save_optimizer: false ({lean / GIB:.2f} GiB each), a smaller keep_last or "
                "save_every, or another output_dir")


_OPTIM_KEY = {"model": "optim", "value_model": "value_optim"}


def _export(model, full: dict, out: str) -> None:
    """model/ (Hugging Face directory, in the training dtype) from the policy's full state; a
    LoRA policy's with its adapters merged, and adapter/ (PEFT's format) beside it."""
    from dlmkern.models.io import save_state
    from dlmkern.models.lora import has_adapters, merged_state
    from dlmkern.models.lora_io import save_adapter

    if not has_adapters(model):
        save_state(model.config, full, os.path.join(out, "model"))
        return
    save_state(model.config, merged_state(model, full), os.path.join(out, "model"))
    save_adapter(model, os.path.join(out, "adapter"), state=full,
                 base=getattr(model, "name_or_path", None))


def _set_models(state: dict, models) -> None:
    """Loads each (name, model, optimizer) from `state`; the optimizer only when its state was
    loaded (a checkpoint without it leaves the optimizer fresh)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    for name, model, opt in models:
        if model is None:
            continue
        if _OPTIM_KEY[name] in state:
            set_state_dict(model, opt, model_state_dict=state[name],
                           optim_state_dict=state[_OPTIM_KEY[name]])
        else:
            set_model_state_dict(model, state[name])


def tensor_bytes(tensors) -> int:
    """Bytes of these tensors at full size (a sharded DTensor counts all ranks' shards)."""
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(model) -> int:
    """MixedPrecisionAdamW's state of `model` once every trained parameter has stepped: fp32
    master and moments for bf16 / fp16 parameters, AdamW's two moments for the others."""
    return sum(p.numel() * (4 * len(_FP32_STATE) if p.dtype in _LOW else 2 * p.element_size())
               for p in model.parameters() if p.requires_grad)


def checkpoint_bytes(model, value_model=None, ref_model=None, *,
                     save_optimizer: bool = True) -> int:
    """Disk of one checkpoint, over all ranks: the dcp state of the models (and the optimizer
    state of the policy and value model, with save_optimizer) plus the Hugging Face export of
    the policy in its dtype. dcp writes tied weights once per state-dict key (measured: twice),
    the export once. Metadata, tokenizer and trainer state (kilobytes) not counted."""
    models = [m for m in (model, value_model, ref_model) if m is not None]
    total = sum(tensor_bytes(m.state_dict().values()) for m in models)
    if save_optimizer:
        total += sum(optimizer_state_bytes(m) for m in (model, value_model) if m is not None)
    return total + tensor_bytes(model.parameters())  # parameters(): a tied one once


def checkpoints_at_once(keep_last: int, saves: int, existing: int = 0) -> int:
    """Checkpoints a run adds to the disk at its peak, `final` included: the periodic ones kept
    beside the `existing` ones, plus the one being written (a temporary directory until the
    oldest is deleted). keep_last 0 keeps every one of the run's `saves`."""
    if keep_last == 0:
        return saves + 1
    return max(1, min(keep_last, existing + saves) + 1 - existing)


def periodic_checkpoints(out_dir: str) -> list[int]:
    """Steps of out_dir's periodic checkpoints (checkpoint-N directories), ascending."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_CKPT.match, os.listdir(out_dir))
                  if m and os.path.isdir(os.path.join(out_dir, m.group(0))))


def stale_checkpoints(out_dir: str, step: int, keep_last: int) -> list[str]:
    """The periodic checkpoints of out_dir up to `step` beyond the newest keep_last (0: none
    is stale), oldest first."""
    steps = [n for n in periodic_checkpoints(out_dir) if n <= step]
    old = steps[:-keep_last] if keep_last else []
    return [os.path.join(out_dir, f"checkpoint-{n}") for n in old]


def _rng_states() -> dict:
    """Every RNG a step may draw from: torch (CPU and, when present, each GPU), Python, numpy."""
    states = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
              "numpy_rng": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(meta: dict) -> None:
    torch.set_rng_state(meta["torch_rng"])
    random.setstate(meta["python_rng"])
    np.random.set_state(meta["numpy_rng"])
    cuda = meta.get("cuda_rng")  # absent: saved on a machine without a GPU
    if cuda is not None and torch.cuda.is_available() and \
            len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet_dcp():
    """torch.distributed.checkpoint warns when used in a single process, which is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def full_state(model) -> dict:
    """The model's full (unsharded) state dict on the CPU; a collective when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
