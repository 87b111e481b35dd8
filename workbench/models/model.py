"""`WorkbenchModel`: one object for any model the workbench can run, local or remote.

It wraps an nnsight model (`.nnsight`) and adds what engines share: the architecture's standard sites
(`.site(name, layer)`), its shape facts (`.cfg`), tokenisation helpers that raise clear errors, and the
remote switch that every trace honours.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from workbench.errors import InputError, SiteError, UnsupportedModelError
from workbench.models.adapters import Adapter, ModelConfig
from workbench.models.sites import SITES, SiteHandle, SiteSpec, envoy_at, output_weights
from workbench.models.tokens import encode


class WorkbenchModel:
    """A model plus its adapter. Build it with `workbench.models.load_model`.

    Attributes:
        nnsight: the nnsight model (`TransformersModel` for transformers models, `NNsight` otherwise).
        module: the underlying `torch.nn.Module` (on the meta device for remote models).
        tokenizer: the Hugging Face tokenizer, or None for models that take tensors.
        cfg: `ModelConfig` (n_layers, n_heads, d_model, ...), or None for plain modules.
        adapter: the architecture `Adapter`, or None for plain modules.
        name: a short identifier (hub id, directory, "demo", or the module's class name).
        remote: False for local execution, True for NDIF, "local" for nnsight's serialising dry run.
    """

    def __init__(
        self,
        nnsight_model,
        *,
        name: str,
        tokenizer=None,
        adapter: Adapter | None = None,
        cfg: ModelConfig | None = None,
        remote: bool | str = False,
        prepend_bos: bool | None = None,
        device: torch.device | None = None,
    ):
        self.nnsight = nnsight_model
        self._intended_device = device  # where lazily loaded weights will go
        self._lock = threading.RLock()
        self.name = name
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.cfg = cfg
        self.remote = remote
        # Like TransformerLens: a BOS token first by default, whether or not the tokenizer would add it.
        if prepend_bos is None:
            prepend_bos = tokenizer is not None and tokenizer.bos_token_id is not None
        self.default_prepend_bos = prepend_bos

    def __getstate__(self):  # remote traces ship the model object; a lock cannot travel
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- basics --------------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.nnsight._module

    @property
    def device(self) -> torch.device:
        if self.remote is True:  # inputs start here and NDIF moves them to its GPUs; the weights are meta
            return torch.device("cpu")
        param = next(self.module.parameters(), None)
        if param is None or (param.device.type == "meta" and self._intended_device is not None):
            return self._intended_device or torch.device("cpu")
        return param.device

    def dispatch(self) -> WorkbenchModel:
        """Load a lazily loaded model's weights now (they load on the first trace otherwise)."""
        if self.remote is True:
            raise UnsupportedModelError("A remote (NDIF) model's weights stay on the server.")
        if hasattr(self.nnsight, "dispatch"):
            self.nnsight.dispatch()
        return self

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    @property
    def is_transformer(self) -> bool:
        return self.adapter is not None

    def __repr__(self) -> str:
        where = (
            "NDIF"
            if self.remote is True
            else (
                "remote=local"
                if self.remote == "local"
                else f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"
            )
        )
        if self.cfg is None:
            return f"WorkbenchModel({self.name!r}, {type(self.module).__name__}, {where})"
        c = self.cfg
        return (
            f"WorkbenchModel({self.name!r}, {c.family}: {c.n_layers} layers x {c.n_heads} heads, "
            f"d_model {c.d_model}, vocab {c.d_vocab}, {where})"
        )

    def trace(self, *inputs, run=None, **kwargs):
        """`nnsight` trace honouring this model's remote setting; HF models run without a KV cache.

        run: the engine call's `workbench.core.Run`; a remote trace is one NDIF job (or one dry run) reported to
        its `reporter`, cancelled by its Stop and bounded by its runner's timeout.

        Traces of one model run one at a time, whatever thread opens them: nnsight interleaves a trace with the
        model's forward pass on greenlets, which cannot switch across threads, and panels run in background
        threads while the notebook goes on.
        """
        remote = kwargs.pop("remote", self.remote)
        if remote and "backend" not in kwargs:
            # imported here so that local runs never load the remote machinery (httpx, websockets, ...)
            from workbench.remote import backend_for

            kwargs["backend"] = backend_for(self, remote, getattr(run, "reporter", None))
        if self.is_transformer:
            kwargs.setdefault("use_cache", False)
        tracer = self.nnsight.trace(*inputs, **kwargs)
        if remote is True:
            return tracer  # nothing runs here: waiting for NDIF must not hold the lock local traces need
        execute = tracer.backend  # nnsight runs the model when the `with` block exits, through this call

        def execute_exclusively(t):
            with self._lock:
                return execute(t)

        tracer.backend = execute_exclusively
        return tracer

    # -- sites ---------------------------------------------------------------------------------------
    def _require_transformer(self, what: str) -> None:
        if self.adapter is None:
            raise UnsupportedModelError(
                f"{what} needs a transformer with an architecture adapter; {self.name!r} is a plain module. "
                "Reach its parts through `model.nnsight.<submodule>` instead."
            )

    def check_site(self, name: str, layer: int | None = None, head: int | None = None) -> SiteSpec:
        """Validate a site name, layer and head for this model; returns its `SiteSpec`."""
        self._require_transformer("Sites")
        spec = SITES.get(name)
        if spec is None:
            raise SiteError(f"Unknown site {name!r}. Sites: {', '.join(SITES)}.")
        if name == "pos_embed" and self.adapter.pos_embed is None:
            raise SiteError(f"{self.cfg.family} models have no learned position embedding (`pos_embed`).")
        if name == "resid_mid" and not self.cfg.has_resid_mid:
            raise SiteError(
                "`resid_mid` does not exist in this model: attention and MLP run in parallel "
                "(use_parallel_residual). Use resid_pre, attn_out, mlp_out or resid_post."
            )
        if spec.per_layer:
            if layer is None:
                raise SiteError(f"`{name}` is per layer: give a layer in 0..{self.cfg.n_layers - 1}.")
            if not -self.cfg.n_layers <= layer < self.cfg.n_layers:
                raise SiteError(
                    f"Layer {layer} is out of range: {self.name} has layers 0..{self.cfg.n_layers - 1}."
                )
        elif layer is not None:
            raise SiteError(f"`{name}` is not per layer; call model.site({name!r}) without a layer.")
        if head is not None:
            n = self.cfg.n_kv_heads if "kv_head" in spec.shape else self.cfg.n_heads
            if not spec.per_head:
                raise SiteError(
                    f"`{name}` has no head axis; per-head sites: "
                    f"{', '.join(s.name for s in SITES.values() if s.per_head)}."
                )
            if not 0 <= head < n:
                raise SiteError(f"Head {head} is out of range: `{name}` has heads 0..{n - 1}.")
        return spec

    def site(self, name: str, layer: int | None = None) -> SiteHandle:
        """A read/write handle on a standard site, for use inside a trace (see `workbench.models.sites`)."""
        self.check_site(name, layer)
        if layer is not None and layer < 0:
            layer += self.cfg.n_layers
        return SiteHandle(self.nnsight, self.module, self.adapter, self.cfg, name, layer)

    def submodule(self, path: str, layer: int | None = None):
        """The nnsight envoy of an adapter part: e.g. ``submodule("ln1", 3)`` or ``submodule("ln_final")``."""
        self._require_transformer("Submodules")
        a = self.adapter
        model_level = {
            "embed": a.embed,
            "pos_embed": a.pos_embed,
            "ln_final": a.ln_final,
            "unembed": a.unembed,
        }
        if path in model_level and model_level[path]:
            return envoy_at(self.nnsight, model_level[path])
        block_level = {"ln1": a.ln1, "ln2": a.ln2, "attn": a.attn, "mlp": a.mlp, "out_proj": a.out_proj}
        if path in block_level:
            self.check_site("resid_pre", layer)
            return envoy_at(envoy_at(self.nnsight, a.blocks)[layer], block_level[path])
        if path == "block":
            self.check_site("resid_pre", layer)
            return envoy_at(self.nnsight, a.blocks)[layer]
        raise SiteError(f"Unknown part {path!r}; parts: {', '.join([*model_level, *block_level, 'block'])}.")

    def torch_submodule(self, path: str, layer: int | None = None) -> torch.nn.Module:
        """Like `submodule`, but the plain torch module (for reading weights outside a trace)."""
        return self.submodule(path, layer)._module

    # -- weights -------------------------------------------------------------------------------------
    def _require_local_weights(self) -> None:
        if self.remote is True:
            raise UnsupportedModelError(
                "Weights of a remote (NDIF) model are not on this machine; read them "
                "inside a remote trace instead."
            )
        self.dispatch()

    def W_O(self, layer: int) -> torch.Tensor:
        """[head, d_head, d_model] output weights of `layer`'s attention heads."""
        self._require_local_weights()
        self.check_site("z", layer)
        return output_weights(self.module, self.adapter, self.cfg, layer % self.cfg.n_layers)

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, d_vocab] unembedding."""
        self._require_local_weights()
        return self.torch_submodule("unembed").weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """[d_vocab] unembedding bias (zeros when the model has none)."""
        bias = getattr(self.torch_submodule("unembed"), "bias", None)
        return (
            bias if bias is not None else torch.zeros(self.cfg.d_vocab, device=self.device, dtype=self.dtype)
        )

    # -- tokens --------------------------------------------------------------------------------------
    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise InputError(
                f"{self.name!r} has no tokenizer; pass token ids (a LongTensor) instead of text."
            )

    def tokenize(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of one text, with BOS first when `prepend_bos` (default: `default_prepend_bos`)."""
        self._require_tokenizer()
        if not isinstance(text, str):
            raise InputError(f"Expected a string, got {type(text).__name__}.")
        if not text.strip():
            raise InputError("The prompt is empty; type some text.")
        prepend = self.default_prepend_bos if prepend_bos is None else prepend_bos
        ids = encode(self.tokenizer, text, prepend)
        if self.cfg is not None and len(ids) > self.cfg.n_ctx:
            raise InputError(
                f"The prompt is {len(ids)} tokens long; {self.name} takes at most {self.cfg.n_ctx}."
            )
        return ids

    def to_tokens(
        self, texts: str | Sequence[str] | torch.Tensor, prepend_bos: bool | None = None
    ) -> torch.Tensor:
        """[batch, pos] token ids on CPU. Texts of one batch must have the same token length (no padding:
        positions must line up for patching); token tensors pass through after checks."""
        if isinstance(texts, torch.Tensor):
            tokens = texts if texts.dim() == 2 else texts.unsqueeze(0)
            if tokens.dtype not in (torch.int64, torch.int32) or tokens.numel() == 0:
                raise InputError("Token tensors must be non-empty integer tensors of shape [batch, pos].")
            if self.cfg is not None and (tokens.max() >= self.cfg.d_vocab or tokens.min() < 0):
                raise InputError(f"Token ids must lie in 0..{self.cfg.d_vocab - 1}.")
            if self.cfg is not None and tokens.shape[1] > self.cfg.n_ctx:
                raise InputError(
                    f"The token tensor is {tokens.shape[1]} tokens long; {self.name} takes at most "
                    f"{self.cfg.n_ctx}. Shorten it."
                )
            return tokens.long().cpu()
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise InputError("No prompts given.")
        ids = [self.tokenize(t, prepend_bos) for t in texts]
        lengths = {len(i) for i in ids}
        if len(lengths) > 1:
            detail = "; ".join(f"{t!r}: {len(i)}" for t, i in zip(texts, ids))
            raise InputError(
                f"Prompts in one batch must have the same number of tokens ({detail}). "
                "Group prompts by length or edit them."
            )
        return torch.tensor(ids, dtype=torch.long)

    def to_str_tokens(self, tokens: str | Sequence[int] | torch.Tensor, prepend_bos: bool | None = None):
        """Each token as a string (for axis labels): list[str] for one sequence, list[list[str]] for a batch."""
        self._require_tokenizer()
        if isinstance(tokens, str):
            tokens = self.tokenize(tokens, prepend_bos)
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() == 2:
                return [self.to_str_tokens(row) for row in tokens]
            tokens = tokens.tolist()
        return [self.tokenizer.decode([int(t)]) for t in tokens]

    def top_tokens(self, prompt: str | torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        """The `k` most likely next tokens after `prompt`, with their probabilities."""
        tokens = self.to_tokens(prompt)[:1]
        with torch.no_grad(), self.trace(tokens):
            logits = self.site("logits").value[0, -1].save()
        probs = torch.softmax(logits.float(), dim=-1)
        top = probs.topk(min(k, probs.numel()))
        return [(self.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]

    def to_single_token(self, text: str) -> int:
        """The id of `text` if it is exactly one token, else an `InputError` that shows how it splits."""
        self._require_tokenizer()
        if not isinstance(text, str) or text == "":
            raise InputError("An answer must be a non-empty string such as ' Mary'.")
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            hint = (
                "" if text.startswith(" ") else " Most tokenizers need a leading space: try ' " + text + "'."
            )
            raise InputError(f"{text!r} is {len(ids)} tokens {pieces}; answers must be a single token.{hint}")
        return ids[0]
