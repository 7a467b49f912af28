"""End-to-end on a CUDA GPU with vLLM (default mode: torch.compile + CUDA graphs).

    python bench/e2e_gpu.py tiny WORKDIR        # tiny Llama: vLLM (compiled, graphs) vs our torch reference
    python bench/e2e_gpu.py make8b WORKDIR [--w4a8] [--synthetic] [--lm-head int8] [--shape qwen2.5-7b]
                                   # random Llama-3-8B-shaped
                                   # bf16 checkpoint + our W8A8 of it (quantized on the GPU), with --w4a8 also W4A8
                                   # (group 128); --synthetic: the quantized checkpoints hold random values (no
                                   # calibration); --lm-head int8: instead *-lmhead checkpoints with lm_head int8
    python bench/e2e_gpu.py table WORKDIR [--rows w8a8,fp8,bf16,w4a8,w8a8-kv8,fp8-kv8,w8a8-pc,fp8-pc,w8a8-lmhead,
                                   w4a8-lmhead,w8a8-noguard,w8a8-coop,w8a8-guard-whole,w8a8-pdl,fp8-pdl] [--tp 2]   # throughput rows
                                   # (w8a8-noguard: the W8A8 checkpoint with quantization_config.token_guard off;
                                   # w8a8-coop: inductor's cooperative reductions on, which spread the guard's row
                                   # maximum over programs; w8a8-guard-whole: the traced guard fused whole into
                                   # every producer, as before the guard in parts)
    python bench/e2e_gpu.py profile WORKDIR [--rows w8a8,fp8] [--batches 1,16,64]   # torch-profiler breakdown of
                                   # decode steps by kernel kind, and wall time per step
    python bench/e2e_gpu.py serve WORKDIR       # `vllm serve` on the tiny W8A8 checkpoint + the openai client

Each engine runs in its own process (GPU memory is freed between rows); its log is parsed for weight memory and
KV-cache size. Timings are offline LLM.generate over random token prompts with ignore_eos, output tokens per second,
the median of REPEATS runs; "spread %" is the largest (max - min) / median of a row's columns, and which column it is.
On the device tool (600 s a call; H200, session 33): make8b --w4a8 --synthetic took ~2 min and a row ~4 min, so
run make8b and each one or two rows in calls of their own, back to back (WORKDIR stays while the machine is warm).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# make8b --shape qwen2.5-7b: the Llama architecture at Qwen2.5-7B's sizes (its GEMM shapes, without q/k/v biases),
# written under the same llama3-8b-* names that the rows read (give it a WORKDIR of its own)
MODEL_SIZES = {"llama3-8b": LLAMA3_8B,
               "qwen2.5-7b": dict(LLAMA3_8B, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)}
CONCURRENCY = (1, 16, 64, 256)
# Each rate is the median of this many runs in one engine: two engines of one checkpoint gave @16 rates 10 % apart
# (session 10), more than the margins measured, and the timed runs are ~10 s of a row's ~100 s (load, compile).
REPEATS = 3
INPUT_LEN, OUTPUT_LEN, PREFILL_LEN, PREFILL_PROMPTS = 512, 256, 2048, 128


def _tiny(workdir: Path) -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after the installed package
    from tests import tiny_models
    from tests.tiny_models import train_tiny_model
    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize
    from vllm_outliertune.offline.reference import load_reference_model

    tiny_models.TINY_SHAPE.update(hidden_size=256, intermediate_size=512)  # head_dim 64 for FlashAttention 3
    model, tokenizer = train_tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(workdir / "tiny-bf16")
    tokenizer.save_pretrained(workdir / "tiny-bf16")
    calib = tiny_models.write_tiny_text(workdir / "calib.txt")
    quantize(workdir / "tiny-bf16", workdir / "tiny-w8a8", calib,
             QuantizeOptions(samples=8, seq_len=128, device="cuda", progress=False), overwrite=True)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids
               for p in ("The old lighthouse keeper", "In the town the market", "Science begins with")]
    llm = LLM(model=str(workdir / "tiny-w8a8"), dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    reference = load_reference_model(workdir / "tiny-w8a8", dtype=torch.bfloat16, device="cuda")
    same = 0
    for ids, out in zip(prompts, outs):
        ref = reference.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                                 do_sample=False)[0, len(ids):].tolist()
        got = list(out.outputs[0].token_ids)
        same += got == ref
        print(f"vLLM  {tokenizer.decode(got)!r}\nref   {tokenizer.decode(ref)!r}")
    print(json.dumps({"tiny_greedy_equal": f"{same}/{len(prompts)}",
                      "compiled": llm.llm_engine.vllm_config.compilation_config.mode != 0}))


def _make8b(workdir: Path, w4a8: bool = False, synthetic: bool = False, lm_head: str = "none",
            sizes: dict = LLAMA3_8B) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after the installed package
    from tests import tiny_models
    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize

    bf16_dir = workdir / "llama3-8b-bf16"
    bf16_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**sizes, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(bf16_dir)
    tiny_models.build_tokenizer().save_pretrained(bf16_dir)  # any tokenizer: ids < vocab; timings ignore values
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    h, inter = sizes["hidden_size"], sizes["intermediate_size"]
    kv = sizes["num_key_value_heads"] * h // sizes["num_attention_heads"]

    def rand(*shape):
        return (0.02 * torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)).cpu()

    weight_map = {}

    def save_shard(tensors, name):
        save_file(tensors, bf16_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    started = time.time()
    save_shard({"model.embed_tokens.weight": rand(sizes["vocab_size"], h), "model.norm.weight":
               torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(sizes["vocab_size"], h)},
               "model-embed.safetensors")
    for i in range(sizes["num_hidden_layers"]):
        p = f"model.layers.{i}."
        save_shard({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                   p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                   p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                   p + "mlp.down_proj.weight": rand(h, inter),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)},
                   f"model-layer{i:02d}.safetensors")
    (bf16_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    print(f"random bf16 checkpoint written in {time.time() - started:.0f} s")
    calib = tiny_models.write_tiny_text(workdir / "calib.txt", repeat=8)
    options = QuantizeOptions(samples=8, seq_len=512, device=device, progress=False, calib_cache=workdir / "calib",
                              lm_head=lm_head)
    suffix = "" if lm_head == "none" else "-lmhead"  # beside the checkpoints without it: rows w8a8-lmhead, ...
    for name, bits in (("w8a8" + suffix, 8),) + ((("w4a8" + suffix, 4),) if w4a8 else ()):
        started = time.time()
        # Every linear in the measured format: the speed rows time W4A8 with all weights packed (the default
        # --int8-weights auto would keep q/k/v at int8).
        bits_options = dataclasses.replace(options, w_bits=bits, int8_weights="none")
        if synthetic:
            _synthetic_quantized(bf16_dir, workdir / f"llama3-8b-{name}", workdir / f"layout-{name}", bits_options)
        else:
            quantize(bf16_dir, workdir / f"llama3-8b-{name}", calib, bits_options, overwrite=True)
        print(f"{name} {'written (synthetic)' if synthetic else 'quantized'} in {time.time() - started:.0f} s")


def _synthetic_quantized(bf16_dir: Path, out_dir: Path, layout_dir: Path, options) -> None:
    """A quantized checkpoint of bf16_dir's shapes holding random values but exactly the tensors (names, dtypes,
    which optional input vectors) that `outliertune quantize` writes for this architecture: those of a small model
    of the same config family, quantized for real first. GEMM and quantization kernels run the same work whatever
    the values, and quantizing the 8B shape costs minutes of GPU time (W4A8 with GPTQ more)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after the installed package
    from tests import tiny_models
    from vllm_outliertune import format as fmt
    from vllm_outliertune.offline.checkpoint import write_checkpoint
    from vllm_outliertune.offline.quantize import quantize

    config = AutoConfig.from_pretrained(bf16_dir)
    small = AutoConfig.from_pretrained(bf16_dir, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small).save_pretrained(layout_dir / "bf16")
    tiny_models.build_tokenizer(512).save_pretrained(layout_dir / "bf16")
    calib = tiny_models.write_tiny_text(layout_dir / "calib.txt")
    quantize(layout_dir / "bf16", layout_dir / "quantized", calib,
             dataclasses.replace(options, samples=4, seq_len=64, calib_cache=None), overwrite=True)
    layout = {}
    for file in sorted((layout_dir / "quantized").glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            layout |= {name: f.get_slice(name).get_dtype() for name in f.keys()}

    def quantized_prefix(prefix: str) -> str | None:
        """The layout's name for a quantized linear of the big model (layer 0's), None if it is not one."""
        layer0 = re.sub(r"\.layers\.\d+\.", ".layers.0.", prefix, count=1)
        return layer0 if f"{layer0}.weight_scale" in layout else None

    # The big model's linear shapes, and its tensors only where the synthetic checkpoint keeps them (norms,
    # embeddings): reading the 15 GB of linear weights would only give their shapes.
    shapes, bf16 = {}, {}
    for file in sorted(bf16_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if quantized_prefix(name.rsplit(".", 1)[0]):
                    shapes[name.rsplit(".", 1)[0]] = f.get_slice(name).get_shape()
                else:
                    bf16[name] = f.get_tensor(name)
    spec = options.quant_config
    packed_specs = {t.suffix: t for t in spec.linear_tensors}
    int8_specs = {t.suffix: t for t in fmt.LINEAR_TENSORS + fmt.EXACT_TENSORS}  # int8 weights (also in 4-bit models)
    gen = torch.Generator().manual_seed(0)

    def synthetic(name: str):
        prefix, _, suffix = name.rpartition(".")
        if prefix not in shapes:
            return bf16[name]  # norms, embeddings: as in the bf16 model
        out_features, in_features = shapes[prefix]
        packed = layout[f"{quantized_prefix(prefix)}.weight"] == "U8"
        tensor_spec = (packed_specs if packed else int8_specs)[suffix]
        shape = tensor_spec.shape(out_features, in_features, spec.groups(in_features) if packed else 1)
        return _random_tensor(suffix, shape, spec, packed, gen)

    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in (n for n in layout if n.startswith("model.layers.0.")):
            name = name.replace("model.layers.0.", f"model.layers.{layer}.", 1)
            tensors[name] = synthetic(name)
    tensors |= {name: synthetic(name) for name in layout if not name.startswith("model.layers.")}  # + lm_head
    missing = {n.replace("model.layers.0.", "", 1) for n in layout if n.startswith("model.layers.0.")} - {
        n.split(".", 3)[3] for n in tensors if n.startswith("model.layers.")}
    assert not missing, f"synthetic checkpoint lacks {missing}"
    write_checkpoint(out_dir, bf16_dir, config.to_dict(), spec, tensors)


def _random_tensor(suffix: str, shape: tuple[int, ...], spec, packed: bool, gen):
    """Values inside what the loader accepts (format.check_linear_values) and small enough that 32 layers of them
    stay finite."""
    import torch
    from vllm_outliertune import format as fmt

    if suffix == "weight" and packed:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if suffix == "weight":
        qmax = fmt.weight_qmax(spec.weight_bits if not spec.packed else 8)
        return torch.randint(-qmax, qmax + 1, shape, generator=gen, dtype=torch.int8)
    if suffix == "weight_group_scale":  # |code - zero| <= 15, times at most 8: inside int8
        return torch.randint(1, 9, shape, generator=gen, dtype=torch.uint8)
    if suffix == "weight_group_zero":
        return torch.randint(0, fmt.PACKED_CODE_MAX + 1, shape, generator=gen, dtype=torch.uint8)
    if suffix.startswith("input_"):  # layers that share an input (q/k/v, gate/up) carry the same vectors
        gen = torch.Generator().manual_seed(shape[0])
    if suffix in ("weight_scale", "input_inv_scale"):
        return (torch.rand(shape, generator=gen) + 0.5) * (1e-5 if suffix == "weight_scale" else 1.0)
    return 0.01 * torch.randn(shape, generator=gen)  # output_bias, input_shift


def median_spread(rates: list[float]) -> tuple[float, float]:
    """(median, (max - min) / median) of repeated rates."""
    ordered = sorted(rates)
    median = ordered[len(ordered) // 2]
    return median, (ordered[-1] - ordered[0]) / median


def _row(model_dir: str, label: str, quantization: str | None, dummy: bool, kv_cache_dtype: str | None,
         tp: int = 1, prefix_caching: bool = False, inductor: dict | None = None) -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=model_dir, skip_tokenizer_init=True, max_model_len=4096, gpu_memory_utilization=0.9,
                  max_num_seqs=256, enable_prefix_caching=prefix_caching, tensor_parallel_size=tp)
    if quantization:
        kwargs["quantization"] = quantization
    if kv_cache_dtype:
        kwargs["kv_cache_dtype"] = kv_cache_dtype
    if dummy:
        kwargs["load_format"] = "dummy"
    if inductor:
        kwargs["compilation_config"] = {"inductor_compile_config": inductor}
    llm = LLM(**kwargs)
    gen = torch.Generator().manual_seed(0)

    def prompts(count, length):
        return [TokensPrompt(prompt_token_ids=torch.randint(0, 128000, (length,), generator=gen).tolist())
                for _ in range(count)]

    def timed(batch, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - started

    def median_rate(tokens: int, count: int, length: int, max_tokens: int) -> tuple[float, float]:
        """tokens per second over REPEATS runs on fresh prompts: (median, spread)."""
        return median_spread([tokens / timed(prompts(count, length), max_tokens) for _ in range(REPEATS)])

    timed(prompts(4, INPUT_LEN), 8)  # warm-up
    row, spreads = {"label": label}, {}
    for n in CONCURRENCY:
        row[f"tok/s@{n}"], spreads[f"@{n}"] = median_rate(n * OUTPUT_LEN, n, INPUT_LEN, OUTPUT_LEN)
    row["prefill tok/s"], spreads["prefill"] = median_rate(PREFILL_PROMPTS * PREFILL_LEN, PREFILL_PROMPTS,
                                                           PREFILL_LEN, 1)
    widest = max(spreads, key=spreads.get)
    row["spread %"] = f"{100 * spreads[widest]:.1f} ({widest})"  # and which column: is a missed target noise?
    print("ROW " + json.dumps(row), flush=True)


class Row(NamedTuple):
    """One throughput row: an engine over model_dir with these vLLM options."""
    label: str
    model_dir: str
    quantization: str | None = None
    dummy: bool = False  # load_format="dummy": random weights (the bf16 and fp8 rows)
    kv_cache_dtype: str | None = None
    prefix_caching: bool = False
    inductor: dict | None = None  # vLLM's compilation_config.inductor_compile_config
    # Environment of the row's process. vLLM's compile cache does not key on our environment variables: a row with
    # env compiles afresh (VLLM_DISABLE_COMPILE_CACHE), else it may load another row's graphs of the same checkpoint.
    env: dict | None = None


def _without_token_guard(checkpoint: str) -> str:
    """checkpoint + "-noguard": the same weights (linked) with the per-token overflow guard turned off in its
    quantization_config, written on first use: what the guard (on by default for W8A8 and W4A8) costs at run time,
    on the same tensors."""
    src, dst = Path(checkpoint), Path(checkpoint + "-noguard")
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.mkdir()
        for item in src.iterdir():
            if item.name != "config.json":
                (tmp / item.name).symlink_to(item.resolve())
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"]["token_guard"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(dst)
    return str(dst)


def _table(workdir: Path, only: str = "bf16,w8a8,fp8", tp: int = 1) -> None:
    bf16, w8a8, w4a8 = (str(workdir / f"llama3-8b-{name}") for name in ("bf16", "w8a8", "w4a8"))
    rows = {"bf16": Row("bf16", bf16, dummy=True),
            "w8a8": Row("outliertune W8A8", w8a8),
            "w8a8-noguard": Row("outliertune W8A8 without token guard", w8a8 + "-noguard"),
            "w8a8-coop": Row("outliertune W8A8, inductor cooperative reductions", w8a8,
                             inductor={"triton.cooperative_reductions": True}),
            # inductor's programmatic dependent launch: its kernels start while the previous kernel drains
            "w8a8-pdl": Row("outliertune W8A8, inductor PDL", w8a8, inductor={"triton.enable_pdl": True}),
            "fp8-pdl": Row("vLLM fp8 (dynamic), inductor PDL", bf16, "fp8", dummy=True,
                           inductor={"triton.enable_pdl": True}),
            "w8a8-guard-whole": Row("outliertune W8A8, traced guard whole in every layer", w8a8,
                                    env={"OUTLIERTUNE_GUARD_IN_PARTS_MIN_K": str(1 << 30)}),
            # a tile table under trial (e.g. bench/splitk_refine.py's refined_table.json copied to WORKDIR) as the
            # user table, against the shipped one in the "w8a8" row
            "w8a8-table": Row("outliertune W8A8, WORKDIR/tile_configs.json as the user tile table", w8a8,
                              env={"OUTLIERTUNE_TILE_CONFIGS": str(workdir / "tile_configs.json")}),
            "w4a8": Row("outliertune W4A8 (g128)", w4a8),
            "w8a8-lmhead": Row("outliertune W8A8 + int8 lm_head", w8a8 + "-lmhead"),
            "w4a8-lmhead": Row("outliertune W4A8 (g128) + int8 lm_head", w4a8 + "-lmhead"),
            "fp8": Row("vLLM fp8 (dynamic)", bf16, "fp8", dummy=True),
            "w8a8-kv8": Row("outliertune W8A8 + fp8 KV", w8a8, kv_cache_dtype="fp8"),
            "fp8-kv8": Row("vLLM fp8 (dynamic) + fp8 KV", bf16, "fp8", dummy=True, kv_cache_dtype="fp8"),
            # vLLM's defaults: prefix caching on (chunked prefill is always on in vLLM's V1 engine)
            "w8a8-pc": Row("outliertune W8A8 + prefix caching", w8a8, prefix_caching=True),
            "fp8-pc": Row("vLLM fp8 (dynamic) + prefix caching", bf16, "fp8", dummy=True, prefix_caching=True)}
    results = [json.loads(line) for line in (workdir / "rows.jsonl").read_text().splitlines()] \
        if (workdir / "rows.jsonl").exists() else []
    if "w8a8-noguard" in only.split(","):
        _without_token_guard(w8a8)
    if "w8a8-table" in only.split(",") and not (workdir / "tile_configs.json").is_file():
        raise SystemExit(f"row w8a8-table: copy the tile table to try to {workdir / 'tile_configs.json'} first")
    for row_spec in (rows[key] for key in only.split(",")):
        label = row_spec.label + (f" TP {tp}" if tp > 1 else "")
        command = [sys.executable, __file__, "row", row_spec.model_dir, "--label", label, "--tp", str(tp)] + (
            ["--quantization", row_spec.quantization] if row_spec.quantization else []) + (
            ["--dummy"] if row_spec.dummy else []) + (
            ["--kv-cache-dtype", row_spec.kv_cache_dtype] if row_spec.kv_cache_dtype else []) + (
            ["--prefix-caching"] if row_spec.prefix_caching else []) + (
            ["--inductor", json.dumps(row_spec.inductor)] if row_spec.inductor else [])
        started = time.time()
        env = dict(os.environ, **row_spec.env, VLLM_DISABLE_COMPILE_CACHE="1") if row_spec.env else None
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
        log_name = re.sub(r"\W+", "-", label)
        (workdir / f"log-{log_name}.txt").write_text(log)
        match = re.search(r"^ROW (.*)$", log, re.M)
        if proc.returncode or not match:
            print(f"{label}: failed (rc {proc.returncode})\n{log[-3000:]}")
            continue
        row = json.loads(match.group(1))
        weights = re.search(r"Model loading took ([\d.]+) GiB", log)
        kv_tokens = re.search(r"GPU KV cache size: ([\d,]+) tokens", log)
        row["weights GiB"] = float(weights.group(1)) if weights else None
        row["KV tokens"] = kv_tokens.group(1) if kv_tokens else None
        row["wall s"] = round(time.time() - started)
        results.append(row)
        with (workdir / "rows.jsonl").open("a") as file:  # rows of earlier calls join the table
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    if not results:
        return
    columns = [c for c in results[0] if c != "label"]
    print("\n| row | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for row in results:
        print(f"| {row['label']} | " + " | ".join(
            f"{row.get(c):.1f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns) + " |")
    def tp_of(label: str) -> str:
        return label[label.find(" TP "):] if " TP " in label else ""

    for base_label in ("bf16", "vLLM fp8 (dynamic)"):  # ratios against the baselines of the same TP size
        for row in results:
            base = next((b for b in results if b["label"] == base_label + tp_of(row["label"])), None)
            if base is not None and row is not base:
                print(f"{row['label']} / {base['label']}: " + ", ".join(
                    f"{c} {row[c] / base[c]:.2f}x" for c in columns if "tok/s" in c and base.get(c)))


# Kernel kinds of a decode step, by the kernel names the profiler reports (first match wins). Inductor names its
# fused kernels after the ops they contain: "round" marks one that writes our int8 codes.
KERNEL_KINDS = (
    ("our int8 GEMMs", ("_int8_gemm_kernel", "_int8_gemm_tma_kernel", "_splitk_gemm_kernel")),
    ("our W4A8 GEMMs", ("_w4a8_gemm_kernel", "_w4a8_gemv_kernel", "_w4a8_wgmma_kernel", "_w4a8_wgmma_swap_kernel")),
    ("our W4A8 unpack to int8 (M above the GEMM's buckets)", ("_unpack_kernel",)),
    ("CUTLASS int8 (cutlass_scaled_mm)", ("cutlass_3x_gemm<signed char",)),
    ("CUTLASS fp8 (vLLM's fp8 row)", ("float_e4m3",)),
    # vLLM's fp8 row: RMSNorm / SiLU-mul + per-token fp8 quant, fused by inductor (named after the GEMM they feed)
    ("RMSNorm / SiLU-mul + fp8 quant (fused by inductor)", ("triton_.*cutlass_scaled_mm",)),
    ("our activation quant (standalone)", ("_quantize_activation_kernel",)),
    ("our token-guard fix-up (after the guard in parts)", ("_guard_fixup_kernel",)),
    ("RMSNorm + quant (fused by inductor)", ("round.*(mean|rsqrt|rms_norm)", "(mean|rsqrt|rms_norm).*round")),
    ("SiLU-mul + quant (fused by inductor)", ("round.*(silu|sigmoid)", "(silu|sigmoid).*round")),
    ("activation quant (inductor, standalone)", ("round",)),
    ("attention", ("flash", "fmha", "attn", "attention")),
    ("cuBLAS / other GEMM (lm_head)", ("gemm", "cutlass", "nvjet", "xmma", "sm90")),
    ("fills (torch.zeros, memset)", ("fillfunc", "memset")),
    ("everything else", ("",)),
)


def _kernel_times(trace_path: Path) -> dict[str, float]:
    """Total µs per kernel name in a chrome trace written by torch.profiler."""
    totals: dict[str, float] = {}
    for event in json.loads(trace_path.read_text())["traceEvents"]:
        if event.get("cat") == "kernel":
            totals[event["name"]] = totals.get(event["name"], 0.0) + event.get("dur", 0.0)
    return totals


def _kind(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next(kind for kind, patterns in KERNEL_KINDS if any(re.search(p, name) for p in patterns))


def _profile(workdir: Path, checkpoints: str = "w8a8", batches: str = "1,16,64") -> None:
    """Profile generation at ``batches`` sequences (default 1, 16 and 64) of each checkpoint (llama3-8b-NAME, or
    fp8: vLLM's fp8 on random weights): (prefill + 81 tokens) minus (prefill + 17 tokens) per kernel name = 64
    decode steps; print the share of each kernel kind, and the wall time per step next to the kernels' sum (the
    difference: launch gaps and host work the CUDA graphs do not hide)."""
    names = checkpoints.split(",")
    if len(names) > 1:  # one engine per process: each checkpoint in its own child
        for name in names:
            subprocess.run([sys.executable, __file__, "profile", str(workdir), "--rows", name, "--batches", batches],
                           check=False)
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, where the profiler looks
    _profile_checkpoint(workdir, checkpoints, [int(batch) for batch in batches.split(",")])


def _profile_checkpoint(workdir: Path, name: str, batches: list[int]) -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # "fp8": vLLM's dynamic fp8 on the bf16 checkpoint's config with random weights, as the table's fp8 row
    model = dict(model=str(workdir / "llama3-8b-bf16"), quantization="fp8", load_format="dummy") if name == "fp8" \
        else dict(model=str(workdir / f"llama3-8b-{name}"))
    llm = LLM(**model, skip_tokenizer_init=True, max_model_len=4096, gpu_memory_utilization=0.9, max_num_seqs=256,
              enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(0)
    decode_steps = 64
    # Both runs get past the prefill before their steps are compared: 64 prompts prefill in chunks, and the first
    # prompts decode beside the later chunks (mixed steps whose GEMMs run at larger M), so a run of one token
    # against one of 65 counted those mixed steps as decode (session 12: negative CUTLASS and unpack times @64).
    first_tokens = 17
    for batch in batches:
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(0, 128000, (INPUT_LEN,), generator=gen).tolist())
                   for _ in range(batch)]
        per_run, wall = {}, {}
        for max_tokens in (first_tokens, first_tokens + decode_steps):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)  # warm-up of this shape
            torch.cuda.synchronize()
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            wall[max_tokens] = time.perf_counter() - started
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                llm.generate(prompts, params, use_tqdm=False)
                torch.cuda.synchronize()
            trace = workdir / f"trace-{name}-{batch}-{max_tokens}.json"
            prof.export_chrome_trace(str(trace))
            per_run[max_tokens] = _kernel_times(trace)
        last = first_tokens + decode_steps
        decode = {kernel: per_run[last].get(kernel, 0.0) - per_run[first_tokens].get(kernel, 0.0)
                  for kernel in per_run[last]}
        by_kind: dict[str, float] = {}
        for kernel, us in decode.items():
            by_kind[_kind(kernel)] = by_kind.get(_kind(kernel), 0.0) + us
        total = sum(by_kind.values())
        step_us = 1e6 * (wall[last] - wall[first_tokens]) / decode_steps
        print(f"\n{name} decode, {batch} sequence(s): {step_us:.0f} µs per step (wall, unprofiled), "
              f"{total / decode_steps:.0f} µs of kernels")
        print("| kernel kind | µs per step | share of kernels |\n|---|---|---|")
        for kind, _ in KERNEL_KINDS:
            if kind in by_kind:
                print(f"| {kind} | {by_kind[kind] / decode_steps:.1f} | {100 * by_kind[kind] / total:.1f} % |")
        print(f"| not in a kernel (wall - kernels) | {step_us - total / decode_steps:.1f} | |")
        top = sorted(decode.items(), key=lambda item: -item[1])[:12]
        print("top kernels: " + "; ".join(f"{kernel[:70]} {us / decode_steps:.1f} µs" for kernel, us in top),
              flush=True)


def _serve(workdir: Path) -> None:
    """`vllm serve` (compiled + CUDA graphs) on the tiny W8A8 checkpoint made by the tiny step, then the openai
    client: a completion, a chat, a stream and 256 concurrent completions."""
    import openai
    import requests

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after the installed package
    from tests.servers import HOST, free_port, serving

    checkpoint = str(workdir / "tiny-w8a8")
    port = free_port()
    command = ["vllm", "serve", checkpoint, "--quantization", "outliertune", "--host", HOST, "--port", str(port),
               "--max-model-len", "512", "--gpu-memory-utilization", "0.3"]
    with serving(command, port, workdir / "serve.log", timeout_s=400) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        completion = client.completions.create(model=checkpoint, prompt="The old lighthouse keeper", max_tokens=16,
                                               temperature=0.0)
        print(f"completion: {completion.choices[0].text!r}")
        chat = client.chat.completions.create(model=checkpoint, max_tokens=16, temperature=0.0,
                                              messages=[{"role": "user", "content": "Tell me about the river."}])
        print(f"chat: {chat.choices[0].message.content!r}")
        pieces = [chunk.choices[0].text for chunk in client.completions.create(
            model=checkpoint, prompt="The old lighthouse keeper", max_tokens=16, temperature=0.0, stream=True)]
        same = "".join(pieces) == completion.choices[0].text
        print(f"stream: {len(pieces)} chunks, same text as the completion: {same}")

        def one(i: int) -> str:
            return client.completions.create(model=checkpoint, prompt=f"Request {i}: the market", max_tokens=32,
                                             temperature=0.0).choices[0].text

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            texts = list(pool.map(one, range(256)))
        print(json.dumps({"concurrent_requests": len(texts), "answered": sum(bool(t) for t in texts),
                          "wall_s": round(time.monotonic() - t0, 2),
                          "healthy_after": requests.get(f"{base}/health", timeout=5).status_code == 200}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["tiny", "make8b", "table", "row", "profile", "serve"])
    parser.add_argument("path")
    parser.add_argument("--label", default="")
    parser.add_argument("--quantization")
    parser.add_argument("--dummy", action="store_true")
    parser.add_argument("--kv-cache-dtype", help="row: vLLM's kv_cache_dtype (e.g. fp8)")
    parser.add_argument("--rows", help="table: which rows to run now (default bf16,w8a8,fp8); profile: which "
                        "checkpoints (default w8a8)")
    parser.add_argument("--batches", default="1,16,64", help="profile: the numbers of sequences")
    parser.add_argument("--prefix-caching", action="store_true", help="row: enable_prefix_caching=True")
    parser.add_argument("--inductor", type=json.loads, help="row: vLLM's inductor_compile_config (JSON)")
    parser.add_argument("--tp", type=int, default=1, help="table / row: tensor-parallel size")
    parser.add_argument("--w4a8", action="store_true", help="make8b: also write a W4A8 checkpoint")
    parser.add_argument("--lm-head", choices=["none", "int8"], default="none",
                        help="make8b: int8: write llama3-8b-w8a8-lmhead (and -w4a8-lmhead) with lm_head quantized "
                             "too (table rows w8a8-lmhead, w4a8-lmhead)")
    parser.add_argument("--shape", choices=sorted(MODEL_SIZES), default="llama3-8b",
                        help="make8b: the model sizes (qwen2.5-7b: Llama at Qwen2.5-7B's GEMM shapes, same names)")
    parser.add_argument("--synthetic", action="store_true", help="make8b: quantized checkpoints of random values "
                        "with the tensors a real quantize writes (seconds instead of minutes; for speed rows only)")
    args = parser.parse_args()
    if args.step == "row":
        _row(args.path, args.label, args.quantization, args.dummy, args.kv_cache_dtype, args.tp, args.prefix_caching,
             args.inductor)
        return
    workdir = Path(args.path)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.step == "table":
        _table(workdir, args.rows or "bf16,w8a8,fp8", args.tp)
    elif args.step == "make8b":
        _make8b(workdir, args.w4a8, args.synthetic, args.lm_head, MODEL_SIZES[args.shape])
    elif args.step == "profile":
        _profile(workdir, args.rows or "w8a8", args.batches)
    else:
        {"tiny": _tiny, "serve": _serve}[args.step](workdir)


if __name__ == "__main__":  # vLLM spawns engine processes that re-import this file
    main()
