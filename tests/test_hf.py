"""Hugging Face models in and out: tiny random transformers models (built here, never downloaded) imported at
TP=2 PP=2 and TP=1 give transformers' own logits in megatron-core; megagrow-trained and grown checkpoints exported
load with AutoModelForCausalLM and give megatron-core's logits; import then export is the identity."""

import glob
import json
import os
import shutil

import pytest
import torch

from conftest import tiny_args, pretrain_job
from test_checkpoint import logits, megagrow

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (a transformers dependency)

VOCAB = 1000
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
VARIANTS = {  # name: (config class, model class, config fields beyond SMALL)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", {
        "tie_word_embeddings": True, "num_key_value_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def tokens(vocab: int) -> torch.Tensor:
    """The tokens tests/logits_worker.py feeds megatron-core."""
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


def hf_logits(model_dir, vocab: int = VOCAB) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens(vocab)).logits


def hf_tensors(model_dir) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(str(model_dir), "*.safetensors"))):
        out.update(load_file(f))
    return out


def make_hf(variant: str, out, shard="60KB"):
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random norms and biases, so that a misplaced one shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)
    model.save_pretrained(str(out), max_shard_size=shard)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return {v: make_hf(v, d / v) for v in VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_gives_transformers_logits_and_exports_back(hf_models, variant, tmp_path):
    source = hf_models[variant]
    assert len(glob.glob(str(source / "model-*.safetensors"))) > 1  # sharded, with its index
    reference = hf_logits(source)
    megatron = tmp_path / "tp2pp2"
    megagrow("checkpoint", "convert", "--load", str(source), "--save", str(megatron), "--target-tp", "2",
             "--target-pp", "2", "--quiet")
    assert (logits(megatron, 4, tmp_path) - reference).abs().max() <= 1e-4
    back = tmp_path / "back"
    megagrow("checkpoint", "export", "--load", str(megatron), "--save", str(back), "--max-shard-size", "100KB",
             "--quiet")
    before, after = hf_tensors(source), hf_tensors(back)
    if SMALL["tie_word_embeddings"] or VARIANTS[variant][2].get("tie_word_embeddings"):
        before.pop("lm_head.weight", None)
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    config = json.load(open(back / "config.json"))
    assert config["model_type"] == json.load(open(source / "config.json"))["model_type"]
    assert os.path.isfile(back / "model.safetensors.index.json") and os.path.isfile(back / "generation_config.json")


def as_bin_shards(model_dir, out):
    """The model as older releases ship it: pytorch_model-*.bin shards (torch.save) with their index."""
    os.makedirs(out)
    shutil.copy(model_dir / "config.json", out / "config.json")
    tensors = hf_tensors(model_dir)
    names = sorted(tensors)
    files = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    for file, part in files.items():
        torch.save({n: tensors[n] for n in part}, out / file)
    json.dump({"weight_map": {n: f for f, part in files.items() for n in part}},
              open(out / "pytorch_model.bin.index.json", "w"))
    return out


@pytest.mark.slow
def test_import_bin_shards_at_tp1_in_the_torch_format(hf_models, tmp_path):
    megatron = tmp_path / "tp1"
    source = as_bin_shards(hf_models["qwen3"], tmp_path / "bin")
    megagrow("checkpoint", "convert", "--load", str(source), "--save", str(megatron), "--ckpt-format", "torch",
             "--quiet")
    assert (logits(megatron, 1, tmp_path) - hf_logits(hf_models["qwen3"])).abs().max() <= 1e-4


@pytest.mark.slow
def test_hf_model_grown_with_zero_keeps_its_logits(hf_models, tmp_path):
    grown = tmp_path / "grown"
    out = megagrow("checkpoint", "grow", "--load", str(hf_models["llama"]), "--save", str(grown), "--op", "zero",
                   "--num-layers", "6", "--target-tp", "2", "--target-pp", "2", "--quiet")
    assert "wrote" in out.stdout
    assert (logits(grown, 4, tmp_path) - hf_logits(hf_models["llama"])).abs().max() <= 1e-4


@pytest.mark.slow
def test_trained_and_grown_checkpoints_export_to_transformers(data_dir, tmp_path):
    trained = tmp_path / "trained"
    run = pretrain_job(4, tiny_args(data_dir, **{"--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2",
                                             "--train-iters": "2", "--save": str(trained)}), tmp_path / "m.jsonl")
    assert run.returncode == 0, run.output
    grown = tmp_path / "grown"
    megagrow("checkpoint", "grow", "--load", str(trained), "--save", str(grown), "--op", "stack:g=2", "--quiet")
    masked = tmp_path / "masked"  # new width still opening: not a model transformers can hold yet
    megagrow("checkpoint", "grow", "--load", str(trained), "--save", str(masked), "--op", "msg:steps=4",
             "--hidden-size", "96", "--quiet")
    _one_line_error(megagrow("checkpoint", "export", "--load", str(masked), "--save", str(tmp_path / "no"),
                             check=False), "growth masks", "iteration")
    assert not os.path.exists(tmp_path / "no")
    for source in (trained, grown):
        exported = tmp_path / f"hf_{source.name}"
        megagrow("checkpoint", "export", "--load", str(source), "--save", str(exported), "--quiet")
        vocab = json.load(open(exported / "config.json"))["vocab_size"]
        assert (hf_logits(exported, vocab) - logits(source, 4, tmp_path)).abs().max() <= 1e-4


def _one_line_error(out, *fragments):
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(f in line for f in fragments), line


def test_bad_hugging_face_input_is_one_line_and_writes_nothing(hf_models, tmp_path):
    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(hf_models["llama"], d)
        change(d)
        return d

    def edit_config(**fields):
        def change(d):
            config = json.load(open(d / "config.json"))
            config.update(fields)
            json.dump(config, open(d / "config.json", "w"))
        return change

    def truncate(d):
        first = sorted(glob.glob(str(d / "model-*.safetensors")))[0]
        os.truncate(first, os.path.getsize(first) - 100)

    def drop_shard(d):
        os.remove(sorted(glob.glob(str(d / "model-*.safetensors")))[-1])

    def drop_tensor(d):
        index = json.load(open(d / "model.safetensors.index.json"))
        del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        json.dump(index, open(d / "model.safetensors.index.json", "w"))

    cases = [("family", edit_config(model_type="gemma2"), ("model_type", "gemma2")),
             ("window", edit_config(model_type="mistral", sliding_window=64), ("sliding_window", "64")),
             ("moe", edit_config(num_local_experts=8), ("num_local_experts",)),
             ("act", edit_config(hidden_act="gelu"), ("hidden_act", "gelu")),
             ("rope", edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ("rope_type", "yarn")),
             ("truncated", truncate, ("model-00001", "not a readable safetensors file")),
             ("shard", drop_shard, ("model.safetensors.index.json names", "does not exist")),
             ("tensor", drop_tensor, ("model.layers.1.mlp.up_proj.weight",))]
    from megagrow.checkpoint.convert import convert
    from megagrow.errors import MegagrowError
    for i, (name, change, fragments) in enumerate(cases):
        source, save = broken(name, change), tmp_path / f"out_{name}"
        if i in (0, 5):  # as users see it: one line from the command, no traceback
            _one_line_error(megagrow("checkpoint", "convert", "--load", str(source), "--save", str(save), "--quiet",
                                     check=False), *fragments)
        else:
            with pytest.raises(MegagrowError) as e:
                convert(str(source), str(save), progress=False)
            assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)
        assert not os.path.exists(save) and not os.path.exists(f"{save}.partial"), name


@pytest.mark.slow
def test_released_model_grown_trained_on_with_its_tokenizer_and_exported(bpe, bpe_corpus, data_dir, tmp_path):
    """README's "Grow a released model": a Hugging Face model with its own tokenizer, grown with zero, trained
    on text preprocessed with that tokenizer, exported with it; transformers loads both."""
    from conftest import BPE_VOCAB, run_tool
    released = make_hf("llama", tmp_path / "released")
    config = json.load(open(released / "config.json"))
    config["vocab_size"] = BPE_VOCAB
    json.dump(config, open(released / "config.json", "w"))
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(released)))
    model.save_pretrained(str(released), max_shard_size="60KB")
    transformers.AutoTokenizer.from_pretrained(bpe["hf"]).save_pretrained(str(released))
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(released)]
    run_tool("tools/preprocess_data.py", "--input", str(bpe_corpus / "corpus.jsonl"), "--output-prefix",
             str(tmp_path / "text"), *tok, "--append-eod")
    grown = tmp_path / "grown"
    megagrow("checkpoint", "grow", "--load", str(released), "--save", str(grown), "--op", "zero", "--num-layers", "6",
             "--quiet")
    info = json.loads(megagrow("checkpoint", "inspect", str(released), "--json").stdout)
    flags, shown = {}, info["trainer_flags"]  # the model flags inspect prints for it, as a user would copy them
    for i, token in enumerate(shown):
        if token.startswith("--"):
            flags[token] = shown[i + 1] if i + 1 < len(shown) and not shown[i + 1].startswith("--") else ""
    flags.update({"--num-layers": "6", "--tokenizer-type": tok[1], "--tokenizer-model": tok[3],
                  "--data-path": str(tmp_path / "text_text_document"), "--train-iters": "3", "--load": str(grown),
                  "--save": str(tmp_path / "trained")})
    run = pretrain_job(1, tiny_args(data_dir, **flags), tmp_path / "m.jsonl")
    assert run.returncode == 0 and "loaded checkpoint" in run.output, run.output
    assert sorted(run.losses()) == [1, 2, 3]
    exported = tmp_path / "exported"
    out = megagrow("checkpoint", "export", "--load", str(tmp_path / "trained"), "--save", str(exported), "--quiet")
    assert "tokenizer copied" in out.stdout
    assert transformers.AutoTokenizer.from_pretrained(str(exported)).encode("def f(x):") == \
        transformers.AutoTokenizer.from_pretrained(bpe["hf"]).encode("def f(x):")
    assert (hf_logits(exported, BPE_VOCAB) - logits(tmp_path / "trained", 1, tmp_path)).abs().max() <= 1e-4
