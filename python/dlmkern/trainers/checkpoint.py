"""Checkpoints shared by every trainer: model, value model and optimizers through
torch.distributed.checkpoint (sharded when training on several ranks, loadable on any number of
ranks), RNG states, the trainer's own progress (step, data position, ...) and a Hugging Face
export of the model, written atomically."""

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
from dlmkern.trainers.config import to_dict


class Checkpointing:
    """Mixin. The trainer provides ``model``, ``opt``, ``cfg``, optionally ``value_model`` /
    ``value_opt`` and ``ref_model``, and ``_progress()`` / ``_set_progress(dict)`` for its own
    counters."""

    value_model = None
    value_opt = None

    def _progress(self) -> dict:
        raise NotImplementedError

    def _set_progress(self, meta: dict) -> None:
        raise NotImplementedError

    def save(self, path: str):
        """Writes a checkpoint directory: dcp/ (model, value model, optimizers), model/ (Hugging
        Face export), trainer_state.pt (progress and RNG states), trainer_config.json. A temporary
        directory is renamed into place, so a crash never leaves a half-written checkpoint."""
        import torch.distributed.checkpoint as dcp

        from dlmkern.models.io import save_state

        tmp = path.rstrip("/") + ".tmp"
        if distributed.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        distributed.barrier()
        with _quiet_dcp():
            dcp.save(self._state(), checkpoint_id=os.path.join(tmp, "dcp"))
        full = full_state(self.model)  # collective: every rank takes part
        if distributed.rank() == 0:
            save_state(self.model.config, full, os.path.join(tmp, "model"))  # training dtype
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
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        # Optimizer entries of parameters that never had a gradient (the value model's unused
        # lm_head) are absent from a checkpoint but present in a fresh template: allow that.
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=os.path.join(path, "dcp"),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if self.value_model is not None:
            set_state_dict(self.value_model, self.value_opt,
                           model_state_dict=state["value_model"],
                           optim_state_dict=state["value_optim"])
        if getattr(self, "ref_model", None) is not None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            saved = dcp.FileSystemReader(os.path.join(path, "dcp")).read_metadata()
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

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        state = {"model": model_sd, "optim": optim_sd}
        if self.value_model is not None:
            vsd, vopt = get_state_dict(self.value_model, self.value_opt)
            state.update(value_model=vsd, value_optim=vopt)
        if getattr(self, "ref_model", None) is not None:  # the frozen KL reference, too: a
            # resumed run must not take its current policy as the reference
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state["ref_model"] = get_model_state_dict(self.ref_model)
        return state


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
