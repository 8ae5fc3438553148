"""``load_model``: a transformers model identical to ``from_pretrained(source, tp_plan="auto")``, from an artifact.

The only runtime module that imports transformers. It follows ``from_pretrained``'s own order and reuses its
pieces rather than copying them: the model is built on the meta device with transformers' init context, the
manifest's plan is expanded and applied by ``_resolve_parallel_plans`` and ``apply_tensor_parallelism`` (so the
forward wrappers are transformers' own), an expert-parallel artifact's ``ep_plan`` by ``apply_expert_parallelism``
as ``maybe_distribute_model`` does for ``DistributedConfig(tp_size=N, ep_size=N)``, the mapped tensors are
assigned where transformers' loader would put its freshly read ones, and ``_finalize_model_loading`` ties weights
and gives non-persistent buffers (rotary ``inv_freq``) their values. Only the reading differs: one pre-sliced file
per rank instead of every source file.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from reshard.loaders.consensus import agreed
from reshard.loaders.options import LoadOptions
from reshard.loaders.state_dict import CASTABLE, DeviceArg, DtypeArg, LoadedArtifact, cast_tensor, open_artifact
from reshard.loaders.versions import check_release
from reshard.manifests.dtypes import DTYPES
from reshard.manifests.errors import ManifestError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightTransform
    from transformers.utils.loading_report import LoadStateDictInfo

    from reshard.manifests import Manifest

logger = logging.getLogger(__name__)


def load_model(
    path: str | os.PathLike[str],
    *,
    device_mesh: DeviceMesh | None = None,
    device: DeviceArg = None,
    dtype: DtypeArg = "auto",
    verify: bool = False,
    populate: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    model_class: type[PreTrainedModel] | None = None,
    ep_implementation: str = "auto",
) -> PreTrainedModel:
    """Build the artifact's transformers model, tensor-parallel over ``device_mesh``, from this rank's file only.

    Args:
        path, device_mesh, device, dtype, verify, populate, revision, cache_dir, token: as for ``load_state_dict``
            (see ``LoadOptions``; with ``populate`` the rank file is read in the background while the model is
            built), except that ``dtype="auto"`` builds the model in the dtype ``from_pretrained(dtype="auto")``
            would (``model_dtype``), weights cast where stored otherwise.
        attn_implementation, experts_implementation: as for ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...).
        model_class: the ``PreTrainedModel`` class to build; default ``AutoModelForCausalLM``'s for the config.
        ep_implementation: for an expert-parallel artifact, how tokens reach the experts, as
            ``DistributedConfig.ep_implementation`` (``"auto"``, ``"all_reduce"``, ``"all_to_all"``, ...).

    Returns:
        The model in eval mode, with the parameter names, DTensor placements, forward wrappers, tied weights,
        ``generation_config`` and TP attributes (``_tp_plan``, ``_device_mesh``, ``_tp_size``,
        ``config.distributed_config``) of ``AutoModelForCausalLM.from_pretrained(source, tp_plan="auto")``; its
        ``_device_mesh`` is the caller's mesh. An expert-parallel artifact gives the model of
        ``from_pretrained(source, distributed_config=DistributedConfig(tp_size=N, ep_size=N))``: experts
        ``Shard(0)`` on the ``ep`` mesh (see ``load_state_dict``), ``_ep_plan`` and transformers' EP dispatch.
        On CPU its weights are views of the mapped rank file, paged in on first use (or resident on return with
        ``populate=True``).

    Example (``torchrun --nproc-per-node 2 serve.py``):
        >>> model = load_model("./SmolLM2-1.7B-tp2")  # doctest: +SKIP
        >>> model.generate(input_ids, max_new_tokens=20, do_sample=False)  # doctest: +SKIP
    """
    options = LoadOptions(
        device_mesh=device_mesh,
        device=device,
        dtype=dtype,
        verify=verify,
        populate=populate,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
    )
    artifact = open_artifact(path, options)
    try:  # with populate, the rank file's pages are made resident in the background while the model is built
        with agreed(artifact.mesh):  # building and assigning runs no collective; a failure on one rank stops all
            return _build_model(artifact, attn_implementation, experts_implementation, model_class, ep_implementation)
    finally:
        artifact.wait_resident()


def _build_model(
    artifact: LoadedArtifact,
    attn_implementation: str | None,
    experts_implementation: str | None,
    model_class: type[PreTrainedModel] | None,
    ep_implementation: str = "auto",
) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
    from transformers.distributed import DistributedConfig
    from transformers.distributed.expert_parallel import apply_expert_parallelism
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism
    from transformers.initialization import no_init_weights
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils.generic import ContextManagers

    root, manifest, dtype = str(artifact.root), artifact.manifest, artifact.dtype
    config = AutoConfig.from_pretrained(root)
    cls = model_class or cast("type[PreTrainedModel]", AutoModelForCausalLM._model_mapping[type(config)])
    text_config_class = config.sub_configs.get("text_config")
    if text_config_class is not None and getattr(cls, "config_class", None) is text_config_class:
        # a text model of a multimodal checkpoint (Qwen3_5ForCausalLM of qwen3_5) is built from the text config,
        # as transformers' auto classes build it
        config = config.get_text_config()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    config.name_or_path = root
    dtype = model_dtype(config, artifact) if artifact.auto_dtype else dtype
    config.dtype = dtype
    for key in config.sub_configs:
        if (sub_config := getattr(config, key, None)) is not None:
            sub_config.dtype = dtype
    tp_mesh, ep_mesh, pp_mesh, distributed_config = artifact.tp_mesh, artifact.ep_mesh, artifact.pp_mesh, None
    if tp_mesh is not None and ep_mesh is not None:
        distributed_config = DistributedConfig(
            tp_size=artifact.tp, ep_size=ep_mesh.size(), ep_implementation=ep_implementation
        )
        config.distributed_config = distributed_config
    elif tp_mesh is not None or pp_mesh is not None:
        stages = pp_mesh.size() if pp_mesh is not None else 1
        plan: Any = "auto" if tp_mesh is not None else None  # None: as DistributedConfig(pp_size=P) leaves it
        distributed_config = DistributedConfig(tp_size=artifact.tp, pp_size=stages, tp_plan=plan)
        config.distributed_config = distributed_config

    # torch's initialisers skipped while the meta model is built (transformers' own no_init_weights, which it uses
    # when it builds a model it is about to load into): every weight is replaced by the rank file's, and any the file
    # lacks is initialised by _finalize_model_loading afterwards, as from_pretrained does
    with ContextManagers([*cls.get_init_context(dtype, False, False, False), no_init_weights()]):
        model = cls(config)
        patch_output_recorders(model)
    dtype_plan = model._get_dtype_plan(dtype)
    model._weight_conversions = []  # type: ignore[assignment]  # the rank files hold the model's own names (for now)

    # another transformers release may place a parameter or convert a key otherwise: refused, never another model
    check_release(model, manifest, root, tp=tp_mesh is not None, ep=ep_mesh is not None)
    if distributed_config is not None:
        if manifest.plan_overrides is not None:  # a custom plan: merged into the model's own by transformers
            distributed_config.tp_plan = dict(manifest.plan_overrides)
        model.config.distributed_config = distributed_config
        model._device_mesh = artifact.mesh
        model._is_distributed_loading_by_transformers = True
        model._tp_size = artifact.tp
        model._fsdp_size = 1  # type: ignore[assignment]  # declared None on the class
        tp_plan, ep_plan, _ = model._resolve_parallel_plans(distributed_config)
        if pp_mesh is not None:
            model = _apply_stages(model, pp_mesh, artifact)
            tp_plan = _held_rules(model, tp_plan)
        if tp_mesh is not None:
            apply_tensor_parallelism(model, tp_mesh, tp_plan)
        if ep_mesh is not None and "ep_dispatch_experts" in ep_plan.values():  # as maybe_distribute_model
            apply_expert_parallelism(
                model, ep_mesh, tp_mesh, ep_plan, ep_implementation=distributed_config.ep_implementation
            )

    loading_info = _assign(model, artifact, dtype_plan)
    if pp_mesh is not None and loading_info.unexpected_keys:  # the stage's file and the stage's model disagree
        raise ManifestError(
            f"{artifact.root}: the rank file of this stage holds {sorted(loading_info.unexpected_keys)[0]!r}, which "
            "transformers' pipeline split does not put on this stage"
        )
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=root,
        device_map={"": artifact.device},
        device_mesh=artifact.mesh,
        dtype=dtype,
        dtype_plan=dtype_plan,
    )
    PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
    model._weight_conversions = _ConversionsOnFirstUse(model, manifest)  # type: ignore[assignment]
    model.eval()
    model.set_use_kernels(False, None)
    if model.can_generate():
        model.adjust_generation_fn(  # type: ignore[operator]  # a method, typed through nn.Module.__getattr__
            generation_config=None,
            from_auto_class=True,
            from_pipeline=None,
            pretrained_model_name_or_path=root,
            cache_dir=None,
            force_download=False,
            proxies=None,
            local_files_only=True,
            token=None,
            revision=None,
            subfolder="",
            trust_remote_code=None,
        )
    return model


def model_dtype(config: Any, artifact: LoadedArtifact) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` builds the model in: the dtype of the config it is built from
    (the text config of a multimodal checkpoint's text model), which the conversion records where the source's
    config names none; for an artifact whose config still names none, its stored floating dtype.

    Weights stored in another dtype are cast, as transformers casts them: copies, said once with the remedy."""
    configured = config.dtype
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if configured is None:
        return artifact.dtype
    if configured not in CASTABLE:
        raise ManifestError(
            f"{artifact.root}/config.json: dtype {config.dtype} is not a dtype a model can be built in; pass a "
            "floating dtype= (float32, bfloat16, float16)"
        )
    if configured != artifact.dtype and any(DTYPES[t.dtype].castable for t in artifact.manifest.tensors):
        name = str(configured).removeprefix("torch.")
        logger.warning(
            "%s: config.json builds the model in %s (as transformers' dtype=\"auto\" does) over %s weights: they are "
            "cast, copies rather than views of the mapped rank file; convert with reshard --dtype %s to load "
            "without copies",
            artifact.root, name, str(artifact.dtype).removeprefix("torch."), name,
        )  # fmt: skip
    return cast("torch.dtype", configured)


def _apply_stages(model: PreTrainedModel, pp_mesh: DeviceMesh, artifact: LoadedArtifact) -> PreTrainedModel:
    """transformers' own pipeline split (``apply_pipeline_parallelism``), which must be the one the artifact's
    stages were cut by: the same layer count, base model and tied embeddings."""
    from transformers.distributed.pipeline_parallel import apply_pipeline_parallelism

    pipeline = artifact.manifest.pipeline
    assert pipeline is not None  # the validator requires it with pipeline stages
    layers = len(getattr(model, model.base_model_prefix).layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    built = (layers, model.base_model_prefix, tied)
    if built != (pipeline.layers, pipeline.prefix, pipeline.tied):
        raise ManifestError(
            f"{artifact.root}: the artifact's stages split {pipeline.layers} layers of {pipeline.prefix!r} "
            f"(tied embeddings: {pipeline.tied}), but the model has {layers} of {model.base_model_prefix!r} (tied: "
            f"{tied}); convert again"
        )
    return cast("PreTrainedModel", apply_pipeline_parallelism(model, pp_mesh))


def _held_rules(model: PreTrainedModel, tp_plan: dict[str, str]) -> dict[str, str]:
    """The expanded plan's rules for the modules and parameters this stage still has. transformers expands the plan
    over the whole model and then fails on the first one its pipeline split removed (its tp x pp load raises
    ``KeyError``); the removed modules hold no weight here, so their rules have nothing to apply to."""
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    modules = {name for name, module in model.named_modules() if not isinstance(module, PipelineIdentityLayer)}
    held = modules | {name for name, _ in model.named_parameters()}
    return {name: style for name, style in tp_plan.items() if name in held}


class _ConversionsOnFirstUse(list):  # type: ignore[type-arg]
    """``model._weight_conversions``, found the first time transformers reads it (``save_pretrained``): finding
    them compiles every conversion pattern of the architecture, a second's work nobody loading to serve needs.
    Without renames or fused experts in the manifest, the checkpoint's keys are the model's: nothing to find."""

    def __init__(self, model: PreTrainedModel, manifest: Manifest) -> None:
        super().__init__()
        options = manifest.options
        self._pending = (model, manifest) if options.key_renames or options.renamed or options.fused else None

    def _found(self) -> _ConversionsOnFirstUse:
        if self._pending is not None:
            model, manifest = self._pending
            self._pending = None
            self.extend(_checkpoint_conversions(model, manifest))
        return self

    def __iter__(self):  # type: ignore[no-untyped-def]
        return list.__iter__(self._found())

    def __len__(self) -> int:
        return list.__len__(self._found())

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return list.__getitem__(self._found(), index)

    def __reversed__(self):  # type: ignore[no-untyped-def]
        return list.__reversed__(self._found())


def _checkpoint_conversions(model: PreTrainedModel, manifest: Manifest) -> list[WeightTransform]:
    """The load-time conversions ``from_pretrained`` would have applied to the source checkpoint's own keys, marked
    used as its loader marks them, so that ``save_pretrained`` writes the checkpoint's format back (per-expert keys,
    gpt_neox's ``embed_out``) exactly as a model loaded by transformers does."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    expected = dict.fromkeys(model.state_dict())
    keys = manifest.options.checkpoint_keys([t.name for t in manifest.tensors])
    for key in sorted(keys, key=dot_natural_key):
        rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
    return [conversion for conversion in mapping if conversion.was_used()]


def _assign(model: PreTrainedModel, artifact: LoadedArtifact, dtype_plan: dict[str, torch.dtype]) -> LoadStateDictInfo:
    """Put each mapped tensor where transformers' loader puts a loaded one; report what is missing or unexpected.

    Like ``set_param_for_module``: parameters become ``nn.Parameter`` (DTensor ones keep the meta parameter's
    ``requires_grad``), each flagged ``_is_hf_initialized`` so that ``initialize_weights`` leaves it alone, and a
    tensor is cast only where transformers would cast it (a module kept in float32, a parameter of another dtype).
    A placement or shape that differs from the one transformers gave the meta parameter is an error.
    """
    from transformers.core_model_loading import build_glob_alternation
    from transformers.utils.loading_report import LoadStateDictInfo

    expected = set(model.state_dict().keys())
    info = LoadStateDictInfo(
        missing_keys=set(expected),
        unexpected_keys=set(),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    kept_dtype = build_glob_alternation(list(dtype_plan))[:2] if dtype_plan else None
    for name, value in artifact.tensors.items():
        if name not in expected:
            info.unexpected_keys.add(name)
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        ref = model.get_parameter_or_buffer(name)
        _check_like(name, value, ref)
        target = ref.dtype
        if kept_dtype is not None and (match := kept_dtype[0].search(name)) is not None and match.lastgroup:
            target = dtype_plan[kept_dtype[1][match.lastgroup]]
        if value.dtype != target:
            value = _cast(value, target)
        if leaf not in module._buffers:
            requires_grad = value.is_floating_point() and (ref.requires_grad or not isinstance(ref, DTensor))
            value = torch.nn.Parameter(value, requires_grad=requires_grad)
        value._is_hf_initialized = True
        setattr(module, leaf, value)
        info.missing_keys.discard(name)
    return info


def _check_like(name: str, value: torch.Tensor, ref: torch.Tensor) -> None:
    """The mapped tensor must be what transformers made of the meta parameter: same kind, placement and shapes."""
    if isinstance(ref, DTensor) != isinstance(value, DTensor):
        raise ManifestError(
            f"tensor {name!r}: the artifact makes it {_describe(value)}, but transformers' plan makes it "
            f"{_describe(ref)}; the manifest's plan does not match the model"
        )
    if isinstance(ref, DTensor) and isinstance(value, DTensor):
        same = (
            tuple(ref.placements) == tuple(value.placements)
            and ref.shape == value.shape
            and ref.to_local().shape == value.to_local().shape
        )
    else:
        same = ref.shape == value.shape
    if not same:
        raise ManifestError(f"tensor {name!r}: the artifact has {_describe(value)}, the model expects {_describe(ref)}")


def _describe(tensor: torch.Tensor) -> str:
    if isinstance(tensor, DTensor):
        local = list(tensor.to_local().shape)
        return f"a DTensor {list(tensor.placements)} of shape {list(tensor.shape)}, local {local}"
    return f"a plain tensor of shape {list(tensor.shape)}"


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy in ``dtype``, where transformers' loader casts: a DTensor locally, keeping its placements."""
    return cast_tensor(value, dtype)
