import ast
import json

import jax.numpy as jnp
import pytest

from jaxsparse.bench import markdown_table, matmul_peak_flops, time_fn, write_results
from jaxsparse.bench.arguments import description
from jaxsparse.cli import bench_dir, main

BENCH_NAMES = sorted(p.stem for p in bench_dir().glob("*.py") if not p.stem.startswith("_"))


def assert_only_tables(out: str) -> None:
    """stdout holds only markdown tables (README): progress lines go to stderr."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and all(line.startswith("|") for line in lines), out


def test_time_fn_waits_for_results_and_reports_median():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    timing = time_fn(fn, jnp.ones(4), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times_s) == 3
    assert timing.min_s <= timing.median_s
    with pytest.raises(ValueError, match="repeats=0"):
        time_fn(fn, jnp.ones(1), repeats=0)


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_flops(128, repeats=2) > 1e6


def test_write_results_json_and_markdown(tmp_path):
    rows = [{"name": "a", "x": 1.5}, {"name": "b", "x": 123456.0}]
    json_path, md_path = write_results("demo", rows, ["name", "x"], tmp_path, notes="n")
    assert json.loads(json_path.read_text())["rows"] == rows
    md = md_path.read_text()
    assert "| name | x |" in md and "| b | 123,456 |" in md
    assert markdown_table(rows, ["x"]).count("\n") == 3
    # 1000 .. 9999 read as whole numbers, not in scientific notation ("6.52e+03")
    assert markdown_table([{"x": 6523.4}, {"x": 999.44}], ["x"]).splitlines()[2:] == \
        ["| 6,523 |", "| 999 |"]
    # a column's own format; a row without the column stays empty
    assert markdown_table([{"x": 1.86304}, {}], ["x"], {"x": "{:.4f}"}).splitlines()[2:] == \
        ["| 1.8630 |", "|  |"]


def test_train_step_benchmark_runs_through_the_cli(tmp_path, capsys):
    overrides = ["model.d_model=32", "model.d_ff=64", "data.seq_len=16", "data.batch_size=4",
                 "model.dtype=bfloat16"]
    assert main(["bench", "train_step", "--configs", "transformer_tiny", "--repeats", "1",
                 *(arg for o in overrides for arg in ("--set", o)), "--name", "tiny_step",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "tiny_step.json").read_text())
    rows = results["rows"]
    assert rows[0]["tokens_per_s"] > 0 and 0 < rows[0]["ratio_to_matmul_peak"]
    # measured against a matmul in the model's compute dtype (was float32 whatever the model)
    assert rows[0]["peak_dtype"] == "bfloat16" and "bfloat16" in results["notes"]
    # the table says which settings it measured (README compares two --set runs)
    assert "Overrides: " + " ".join(overrides) in results["notes"]
    assert not (tmp_path / "train_step.json").exists()
    captured = capsys.readouterr()
    assert "ratio_to_matmul_peak" in captured.out
    assert_only_tables(captured.out)
    assert "wrote " in captured.err
    assert main(["bench", "nope"]) == 2


def test_moe_benchmark_times_every_path_forward_and_backward(tmp_path):
    for extra, stem in (([], "moe"), (["--backward"], "moe_backward")):
        assert main(["bench", "moe", "--experts", "4", "--tokens", "64", "--d", "16",
                     "--hidden", "32", "--repeats", "1", "--out", str(tmp_path), *extra]) == 0
        rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
        assert [r["path"] for r in rows] == [
            "dense all-experts", "one-hot einsums", "ragged_dot", "ours: capacity",
            "ours: dropless (tiles)", "ours: dropless (native)"]
        assert rows[0]["speedup_vs_dense"] == 1 and all(r["ms"] > 0 for r in rows)
    # on GPU and TPU the last row is our Pallas kernel ("native" would run the tiles path again)
    assert [_bench_module("moe").fast_kernel(b) for b in ("cpu", "gpu", "tpu")] == [
        "native", "pallas", "pallas"]


def test_expert_parallel_benchmark_times_ragged_against_worst_case_buffers(tmp_path, capfd):
    """Re-runs itself on 4 emulated devices; the rows each path exchanges are the expected
    sizes: E x T per device and exchange for the buffers, T x k routed for the ragged path."""
    tokens, experts, k = 64, 8, 2
    assert main(["bench", "expert_parallel", "--tokens", str(tokens), "--d", "16", "--hidden",
                 "32", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "expert_parallel.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["worst-case buffers", "ours: ragged", "capacity 1.25"]
    assert rows[0]["exchanged_rows_compiled"] == experts * tokens
    assert rows[1]["rows_sent"] == tokens * k
    assert rows[1]["rows_received_max"] >= tokens * k  # the busiest device: at least the mean
    assert rows[0]["speedup_vs_buffers"] == 1 and all(r["ms"] > 0 for r in rows)
    assert_only_tables(capfd.readouterr().out)  # the child process's stdout too


def test_ring_benchmark_times_both_layouts_against_gathered_keys(tmp_path, capfd):
    """Re-runs itself on 4 emulated devices; for each mask the two gathered peers (dense, and
    block-sparse: it skips empty tiles as the ring skips empty pairs) come first and every row
    has its speed-up over each, auto picks zig-zag under the causal mask and contiguous under
    the window, and the critical paths are the schedule's: causal in halves 3 + 4*3
    contiguous, 3 + 2*3 zig-zag, of 36 pairs; the heat maps of work per step and device are
    drawn."""
    assert main(["bench", "ring", "--length", "64", "--heads", "2", "--head-dim", "8",
                 "--window", "8", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = {(r["mask"], r["path"]): r
            for r in json.loads((tmp_path / "ring.json").read_text())["rows"]}
    assert list(rows)[:2] == [("causal", "gathered K/V"), ("causal", "gathered K/V, block-sparse")]
    assert len(rows) == 10
    for (mask, _), r in rows.items():
        dense, sparse = rows[mask, "gathered K/V"], rows[mask, "gathered K/V, block-sparse"]
        assert r["speedup_fwd_bwd"] == pytest.approx(dense["fwd_bwd_ms"] / r["fwd_bwd_ms"])
        assert r["speedup_vs_blocksparse"] == pytest.approx(sparse["fwd_bwd_ms"] / r["fwd_bwd_ms"])
    assert rows["causal", "ring auto"]["layout"] == "zigzag"
    assert rows["window 8", "ring auto"]["layout"] == "contiguous"
    assert rows["causal", "ring contiguous"]["critical_path"] == 15
    assert rows["causal", "ring zigzag"]["critical_path"] == 9
    assert rows["causal", "ring zigzag"]["total_pairs"] == 36
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows.values())
    assert (tmp_path / "ring.png").stat().st_size > 10_000  # the work-per-step heat maps
    captured = capfd.readouterr()
    assert_only_tables(captured.out)  # the per-row JSON lines are progress, on stderr
    assert '"mask": "causal"' in captured.err


def test_monarch_training_pass_keeps_the_forward_on_both_sides():
    """The forward+backward pass returns the forward output, so XLA keeps the forward product:
    3 products' FLOPs on the dense side and on Monarch's einsum form (a bare VJP compiled to
    2 dense products and 2.5 Monarch ones, and the two sides timed different passes)."""
    import importlib.util

    import jax

    from jaxsparse.bench.timing import compiled_flops
    from jaxsparse.ops.monarch import monarch_matmul, monarch_shapes

    spec = importlib.util.spec_from_file_location("monarch_bench", bench_dir() / "monarch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    transform, work = bench.PASSES["forward+backward"]
    tokens, d = 16, 64
    x, w, ct = jnp.ones((tokens, d)), jnp.ones((d, d)), jnp.ones((tokens, d))
    w1, w2 = (jnp.ones(shape) for shape in monarch_shapes(d, d))

    def product(x, w1, w2):
        return monarch_matmul(x, w1, w2, implementation="xla")

    for f, args in ((jnp.dot, (x, w)), (product, (x, w1, w2))):
        forward = compiled_flops(jax.jit(f), *args)
        assert compiled_flops(jax.jit(transform(f, ct)), *args) == pytest.approx(work * forward)


def _bench_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", bench_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_attention_peer_computes_our_causal_attention():
    """JAX's Pallas flash attention, the GPU table's second peer, called as the benchmark calls
    it (interpret mode here): the same causal attention at the same softmax scale as ours,
    forward and gradients, so its row times the same work (its sm_scale defaults to 1)."""
    import jax

    from jaxsparse.ops.attention import dot_product_attention

    peer = _bench_module("attention_gpu").jax_pallas_flash
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 16)) for i in range(3))
    ours = lambda q, k, v: dot_product_attention(q, k, v, mask="causal", implementation="xla")  # noqa: E731
    interpreted = lambda q, k, v: peer(q, k, v, interpret=True)  # noqa: E731
    assert jnp.max(jnp.abs(interpreted(q, k, v) - ours(q, k, v))) < 1e-5
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    for got, want in zip(jax.grad(loss(interpreted), (0, 1, 2))(q, k, v),
                         jax.grad(loss(ours), (0, 1, 2))(q, k, v)):
        assert jnp.max(jnp.abs(got - want)) < 2e-5 * jnp.max(jnp.abs(want))


def test_ssm_benchmark_times_every_implementation_against_the_recurrence(tmp_path):
    """Mamba-1 (one document per row and packed) and Mamba-2 rows, forward and forward +
    backward; on CPU each includes the native kernel (the CPU default), and the first row of
    each group is the lax.scan peer."""
    assert main(["bench", "ssm", "--lengths", "100", "--d-inner", "32", "--d-state", "4",
                 "--heads", "2", "--head-dim", "16", "--ssd-state", "8", "--chunk", "32",
                 "--repeats", "1", "--backward", "--packed", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ssm.json").read_text())["rows"]
    groups = {}
    for r in rows:
        groups.setdefault(r["op"], []).append(r)
    assert set(groups) == {"selective_scan", "selective_scan fwd+bwd", "selective_scan packed 4",
                           "selective_scan packed 4 fwd+bwd", "ssd", "ssd fwd+bwd"}
    for op in ("ssd", "ssd fwd+bwd"):
        assert [r["impl"] for r in groups[op]] == ["recurrence (lax.scan)", "ssd chunk 32", "native"]
    for group in groups.values():
        assert group[0]["speedup_vs_lax_scan"] == 1 and all(r["ms"] > 0 for r in group)


def test_linear_scan_benchmark_times_every_implementation_against_lax_scan(tmp_path, capsys):
    assert main(["bench", "linear_scan", "--shapes", "2x50x20", "--repeats", "1", "--backward",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "linear_scan.json").read_text())["rows"]
    for op in ("linear_scan", "linear_scan fwd+bwd"):
        group = [r for r in rows if r["op"] == op]
        assert [r["impl"] for r in group] == ["sequential", "associative", "native"]
        assert group[0]["speedup_vs_lax_scan"] == 1 and all(r["ms"] > 0 for r in group)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "linear_scan", "--shapes", "2x50", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--shapes: '2x50' must be batch x length x width" in capsys.readouterr().err


def test_hydra_precision_benchmark_times_bfloat16_against_float32_inputs(tmp_path):
    assert main(["bench", "hydra_precision", "--lengths", "40", "--batch", "1", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "hydra_precision.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["sga blocked fwd+bwd", "sga core fwd+bwd",
                                       "sga dense fwd+bwd", "workspace fwd+bwd"]
    for r in rows:
        assert r["bf16_ms"] > 0 and r["f32_ms"] > 0
        assert r["speedup_vs_f32"] == pytest.approx(r["f32_ms"] / r["bf16_ms"])
    assert rows[0]["speedup_vs_blocked"] == 1 and "speedup_vs_blocked" not in rows[-1]
    assert rows[1]["speedup_vs_blocked"] == pytest.approx(rows[0]["bf16_ms"] / rows[1]["bf16_ms"])


def test_sga_gqa_benchmark_times_grouped_heads_against_repeated_ones(tmp_path):
    assert main(["bench", "sga_gqa", "--lengths", "40", "--batch", "1", "--heads", "4",
                 "--kv-heads", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sga_gqa.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["blocked fwd+bwd", "core fwd+bwd", "dense fwd+bwd",
                                       "decode step"]
    for r in rows:
        assert r["gqa_ms"] > 0 and r["repeat_ms"] > 0
        assert r["speedup_vs_repeat"] == pytest.approx(r["repeat_ms"] / r["gqa_ms"])


def test_attention_benchmark_runs_through_the_cli(tmp_path, capsys):
    assert main(["bench", "attention", "--lengths", "256", "--patterns", "window 256",
                 "--heads", "1", "--head-dim", "8", "--repeats", "1", "--table-lengths", "4096",
                 "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "attention.json").read_text())["rows"][0]
    assert row["speedup"] > 0 and row["max_abs_err"] < 1e-5 and 0 < row["density"] <= 1
    tables = json.loads((tmp_path / "attention_block_tables.json").read_text())["rows"]
    assert {r["mask"] for r in tables} == {"causal", "window 512", "bigbird 128"}
    captured = capsys.readouterr()
    assert "attention: 100%" in captured.err  # a progress bar on stderr, not in the tables
    assert "100%" not in captured.out


def test_routing_benchmark_times_split_windows_at_the_cost_of_one_probe(tmp_path, capsys):
    """``--split``: P windows of w/P keys read as many keys per query as one probe of w."""
    assert main(["bench", "routing", "--lengths", "256", "--probes", "1", "4", "--split",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = {r["path"]: r for r in json.loads((tmp_path / "routing.json").read_text())["rows"]}
    assert rows["routing"]["window"] == 16 and rows["routing"]["keys_per_query"] == 16
    assert rows["routing (4 probes)"]["keys_per_query"] == 64
    assert rows["routing (4 probes of w/4)"]["keys_per_query"] == 16
    assert all(r["fwd_bwd_ms"] > 0 for r in rows.values())
    captured = capsys.readouterr()
    assert_only_tables(captured.out)
    assert "L=   256 routing" in captured.err


def test_routing_model_benchmark_times_full_local_and_split_routing_steps(tmp_path, capsys):
    """Whole training steps of the routing study's model, full attention as the peer; the
    routing model reads 4 probes of w/4 keys (w = 256 // 16 = 16)."""
    assert main(["bench", "routing_model", "--lengths", "256", "--tokens", "512", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "routing_model.json").read_text())["rows"]
    assert [r["model"].split(" (")[0].split(",")[0] for r in rows] == [
        "full attention", "local only", "routing"]
    assert "4 probes, window 4 per probe" in rows[2]["model"]
    assert all(r["batch"] == 2 and r["step_ms"] > 0 for r in rows)
    assert rows[0]["speedup_vs_full"] == 1.0
    assert_only_tables(capsys.readouterr().out)


@pytest.mark.parametrize("name, argv, fragment", [
    ("ssm", ["--lengths", "-4"], "argument --lengths: -4 must be >= 1"),  # was an MLIR error
    ("attention", ["--heads", "0"], "argument --heads: 0 must be >= 1"),
    ("train_step", ["--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    ("linear_scan", ["--shapes", "8xabcx4"], "'8xabcx4': sizes must be integers >= 1"),
    # these reached the MoE layer as tracebacks naming its arguments
    ("expert_parallel", ["--devices", "3", "--experts", "4"],
     "--experts 4: must be divisible by --devices 3"),
    ("expert_parallel", ["--devices", "2", "--experts", "4", "--k", "5"],
     "--k 5: must be at most --experts 4"),
])
def test_bench_flags_refuse_sizes_below_one(capsys, name, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", name, *argv])
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err


def test_decode_benchmark_times_our_caches_against_the_alternatives(tmp_path):
    assert main(["bench", "decode", "--cache", "24", "--heads", "4", "--kv-heads", "4", "2",
                 "--window", "5", "--max-global", "3", "--clusters", "3",
                 "--routing-window", "4", "--batch", "1", "--steps", "3",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    # batch 1: the squeezed cache row too; the SGA rings (5 + 3 slots) are below the cache's
    # 24; routing heads (3 x 4 ring slots) have one key/value head per query head
    assert [(r["op"], r["kv_heads"]) for r in rows] == [
        ("layout", 4), ("window 5", 4), ("squeezed", 4), ("sga 5+3", 4), ("routing 3x4", 4),
        ("layout", 2), ("window 5", 2), ("squeezed", 2), ("sga 5+3", 2)]
    for r in rows:
        assert r["ours_ms"] > 0 and r["peer_ms"] > 0
        assert r["speedup"] == pytest.approx(r["peer_ms"] / r["ours_ms"])


def test_bench_help_lists_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ssm" in BENCH_NAMES and "one of: " + ", ".join(BENCH_NAMES) in out


@pytest.mark.parametrize("name", BENCH_NAMES)
def test_bench_help_describes_the_benchmark_in_full_sentences(capsys, name):
    """``jaxsparse bench NAME --help``: the docstring's whole first paragraph, not its first
    line (which cut sentences mid-way: "...(our", "...in one run:")."""
    doc = ast.get_docstring(ast.parse((bench_dir() / f"{name}.py").read_text()))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", name, "--help"])
    assert exit_.value.code == 0
    summary = description(doc)
    assert summary.endswith(".")
    assert summary in " ".join(capsys.readouterr().out.split())


def test_bench_without_a_checkout_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    """A non-editable install has no experiments/bench beside the package: the command listed
    "available: " and nothing."""
    import jaxsparse.cli as cli

    monkeypatch.setattr(cli, "bench_dir", lambda: tmp_path / "missing")
    assert main(["bench", "ssm"]) == 2
    err = capsys.readouterr().err
    assert "the benchmarks are scripts in a checkout's experiments/bench" in err, err
    assert "pip install -e ." in err and "Traceback" not in err
