"""Model building and activation checkpointing (identical gradients with and without)."""

import copy

import pytest
import torch

from trellis import configs
from trellis.engine.model import build_model, check_vocab
from trellis.engine.optim import lr_at
from trellis.errors import ConfigError
from trellis.parallel.activation_checkpoint import apply_activation_checkpointing
from trellis.parallel.data_parallel import decoder_blocks
from trellis.parallel.models import family_for


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_identical_gradients(name, mode):
    cfg = configs.load(name)
    model, _ = build_model(cfg.model, seed=0)
    ckpt = copy.deepcopy(model)
    spec = family_for(model.config.model_type)
    n = apply_activation_checkpointing(decoder_blocks(ckpt, spec), spec, mode)
    assert n == model.config.num_hidden_layers
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    for m in (model, ckpt):
        m.train()
        logits = m(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids.reshape(-1)).backward()
    # Parameter names are unchanged by checkpointing (checkpoints stay layout independent).
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in ckpt.named_parameters()]
    for (k, a), (_, b) in zip(model.named_parameters(), ckpt.named_parameters()):
        assert torch.equal(a.grad, b.grad), k


def test_a_tokenizer_larger_than_the_model_is_a_clear_error_a_smaller_one_is_padding():
    cfg = configs.load("tiny-llama")
    model, _ = build_model(cfg.model, seed=0)

    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    with pytest.raises(ConfigError, match="vocab_size=512 < tokenizer size 1000"):
        check_vocab(model, Tok(1000))
    check_vocab(model, Tok(512))
    check_vocab(model, Tok(448))  # a padded vocabulary (the embedding has 64 rows no token maps to)


def test_pretrained_load_from_local_directory(tmp_path):
    cfg = configs.load("tiny-llama")
    model, _ = build_model(cfg.model, seed=7)
    model.save_pretrained(tmp_path)
    loaded, _ = build_model(configs.load("tiny-llama", {"model.path": str(tmp_path)}).model, seed=123)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_lr_schedule_shapes():
    t = configs.load("tiny-llama", {"train.steps": 10, "train.warmup_steps": 2, "train.lr": 1.0,
                                    "train.min_lr": 0.1, "train.schedule": "cosine"}).train
    lrs = [lr_at(s, t) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] >= 0.1
    lin = configs.load("tiny-llama", {"train.steps": 4, "train.schedule": "linear", "train.warmup_steps": 0,
                                      "train.lr": 1.0, "train.min_lr": 0.0}).train
    assert [lr_at(s, lin) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_a_pretrained_model_is_built_in_train_mode(tmp_path):
    """from_pretrained returns eval mode: a model trained from a pretrained directory ran without dropout (GPT-2's
    configs default to 0.1). (The same eval mode made the QLoRA reference take bitsandbytes' AVX512-BF16 inference
    kernel: tests/distributed/peft_support.py.) build_model hands the engine a model in train mode, every module."""
    cfg = configs.load("tiny-llama")
    model, _ = build_model(cfg.model, seed=7)
    model.save_pretrained(tmp_path)
    loaded, _ = build_model(configs.load("tiny-llama", {"model.path": str(tmp_path)}).model, seed=0)
    assert all(m.training for m in loaded.modules())

