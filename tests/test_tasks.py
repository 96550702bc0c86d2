"""Built-in tasks: registry, batches, summed losses, determinism, masking, tokenizer cache."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from largebatch.train.task import Batch, Task
from largebatch.train.tasks import TASKS, get_task, task_options


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batches_equal(a: Batch, b: Batch) -> bool:
    return a.weight == b.weight and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def fit_steps(task: Task, model, batch: Batch, optimizer, steps: int) -> list[float]:
    """Per-step mean losses of ``steps`` optimizer steps on one fixed batch."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_sum, _ = task.loss(model, batch)
        (loss_sum / batch.weight).backward()
        optimizer.step()
        losses.append(float(loss_sum.detach()) / batch.weight)
    return losses


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_errors():
    assert set(TASKS) == {"mnist-lenet", "cifar10-resnet", "bert-mlm"}
    with pytest.raises(ValueError, match="unknown task 'imagenet'; valid tasks: bert-mlm, cifar10-resnet, mnist-lenet"):
        get_task("imagenet")
    with pytest.raises(ValueError, match="unknown option.* bogus .*valid options: data_dir, train_subset, eval_subset"):
        get_task("mnist-lenet", bogus=1)
    assert "seq_len" in task_options("bert-mlm") and "width" in task_options("cifar10-resnet")


# ---------------------------------------------------------------------------------------------
# mnist-lenet


@pytest.fixture(scope="module")
def mnist():
    return get_task("mnist-lenet", train_subset=512, eval_subset=300)


def test_mnist_shapes_and_normalisation(mnist):
    from largebatch.train.data import default_data_dir, load_mnist

    assert mnist.num_examples("train") == 512 and mnist.num_examples("eval") == 300
    batch = mnist.get_batch("train", torch.tensor([0, 3, 511]))
    assert batch.weight == 3
    assert batch.tensors["x"].shape == (3, 1, 28, 28) and batch.tensors["x"].dtype == torch.float32
    assert batch.tensors["y"].tolist()[0] == 5
    raw = load_mnist(default_data_dir() / "mnist")["train"][0][3].float()
    torch.testing.assert_close(batch.tensors["x"][1, 0], (raw / 255 - 0.1307) / 0.3081)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        mnist.get_batch("test", torch.tensor([0]))


def test_mnist_model_is_lenet5(mnist):
    model = mnist.build_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["conv1.weight"] == (6, 1, 5, 5) and shapes["conv2.weight"] == (16, 6, 5, 5)
    assert shapes["fc1.weight"] == (120, 400) and shapes["fc2.weight"] == (84, 120) and shapes["fc3.weight"] == (10, 84)
    assert sum(p.numel() for p in model.parameters()) == 61706


def test_mnist_loss_is_a_sum_and_accumulates_exactly(mnist):
    torch.manual_seed(0)
    model = mnist.build_model()
    idx = torch.arange(64)
    batch = mnist.get_batch("train", idx)
    loss_sum, sums = mnist.loss(model, batch)
    assert torch.isfinite(loss_sum)
    logits = model(batch.tensors["x"])
    torch.testing.assert_close(loss_sum / batch.weight, F.cross_entropy(logits, batch.tensors["y"]))
    assert float(sums["accuracy"]) == float((logits.argmax(1) == batch.tensors["y"]).sum())

    # Two micro-batches, each loss_sum divided by the total weight, give the big batch's gradient.
    full = [p.grad for p in _grads(model, [(mnist, batch)], batch.weight)]
    parts = [mnist.get_batch("train", idx[:24]), mnist.get_batch("train", idx[24:])]
    accumulated = [p.grad for p in _grads(model, [(mnist, b) for b in parts], sum(b.weight for b in parts))]
    for a, b in zip(full, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _grads(model, pieces, total_weight):
    model.zero_grad(set_to_none=True)
    for task, batch in pieces:
        loss_sum, _ = task.loss(model, batch)
        (loss_sum / total_weight).backward()
    grads = [p for p in model.parameters()]
    out = [torch.nn.Parameter(p.detach().clone()) for p in grads]
    for o, p in zip(out, grads):
        o.grad = p.grad.detach().clone()
    return out


def test_mnist_training_reduces_loss_and_evaluates(mnist):
    torch.manual_seed(0)
    model = mnist.build_model()
    batch = mnist.get_batch("train", torch.arange(128))
    losses = fit_steps(mnist, model, batch, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 25)
    assert losses[-1] < 0.7 * losses[0]
    result = mnist.evaluate(model, batch_size=128)
    assert set(result) == {"loss", "accuracy"} and 0.0 <= result["accuracy"] <= 1.0


def test_mnist_get_batch_deterministic(mnist):
    idx = torch.tensor([5, 1, 9])
    assert batches_equal(mnist.get_batch("train", idx, gen(0)), mnist.get_batch("train", idx, gen(1)))


# ---------------------------------------------------------------------------------------------
# cifar10-resnet


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """Random images in the official python-pickle layout: 5 x 8 train, 12 test."""
    folder = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 12)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder.parent


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    return get_task("cifar10-resnet", data_dir=cifar_dir, width=0.125)


def test_cifar_requires_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="not bundled: pass data_dir=.*data_batch_1.*test_batch"):
        get_task("cifar10-resnet")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        get_task("cifar10-resnet", data_dir=tmp_path / "missing")


@pytest.mark.parametrize(
    "value,expected",
    [(True, True), (False, False), (1, True), (0, False), ("False", False), ("no", False), ("OFF", False),
     ("0", False), ("True", True), ("yes", True), ("On", True), ("1", True)],
)
def test_cifar_augment_option_parses_booleans(cifar_dir, value, expected):
    """A CLI value like augment=False arrives as text: bool("False") would be True."""
    task = get_task("cifar10-resnet", data_dir=cifar_dir, width=0.125, augment=value)
    assert task.augment is expected
    a, b = (task.get_batch("train", torch.arange(8), gen(seed)).tensors["x"] for seed in (0, 1))
    assert torch.equal(a, b) is not expected  # augmented batches depend on the generator


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, None])
def test_cifar_augment_option_refuses_other_values(cifar_dir, value):
    with pytest.raises(ValueError) as info:
        get_task("cifar10-resnet", data_dir=cifar_dir, width=0.125, augment=value)
    assert str(info.value) == f"augment must be a boolean: true/false, 1/0, yes/no, on/off (any case), got {value!r}"


def test_cifar_model_is_resnet9(cifar_dir):
    from largebatch.train.tasks.cifar import ResNet9

    model = ResNet9()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 128, 256, 512, 512, 512]
    assert model.fc.bias is None and model.output_scale == 0.125
    assert sum(p.numel() for p in model.parameters()) == 6_573_120
    assert any(".bn." in n for n, _ in model.named_parameters())
    out = get_task("cifar10-resnet", data_dir=cifar_dir, width=0.125).build_model()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_cifar_eval_batch_is_normalised_raw_data(cifar, cifar_dir):
    from largebatch.train.data import load_cifar10

    raw = load_cifar10(cifar_dir)["test"][0][:4].float()
    batch = cifar.get_batch("eval", torch.arange(4), gen(0))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(batch.tensors["x"], (raw / 255 - mean) / std)
    assert batch.weight == 4


def test_cifar_augmentation_is_crop_and_flip_from_generator(cifar):
    from largebatch.train.tasks.cifar import random_crop_flip

    images = torch.rand(6, 3, 32, 32)
    out = random_crop_flip(images, gen(3))
    g = gen(3)
    offsets = torch.randint(0, 9, (6, 2), generator=g)
    flips = torch.randint(0, 2, (6,), generator=g)
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    for i in range(6):
        dy, dx = offsets[i].tolist()
        crop = padded[i, :, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            crop = crop.flip(-1)
        torch.testing.assert_close(out[i], crop, rtol=0, atol=0)
    keyed = random_crop_flip(images, gen(3), keys=torch.arange(6))  # per example: the split does not matter
    halves = torch.cat([random_crop_flip(images[:2], gen(3), keys=torch.arange(2)),
                        random_crop_flip(images[2:], gen(3), keys=torch.arange(2, 6))])  # fmt: skip
    assert torch.equal(keyed, halves)
    idx = torch.arange(16)
    whole = cifar.get_batch("train", idx, gen(7)).tensors["x"]
    assert torch.equal(whole, torch.cat([cifar.get_batch("train", part, gen(7)).tensors["x"] for part in (idx[:9], idx[9:])]))
    assert batches_equal(cifar.get_batch("train", idx, gen(7)), cifar.get_batch("train", idx, gen(7)))
    assert not batches_equal(cifar.get_batch("train", idx, gen(7)), cifar.get_batch("train", idx, gen(8)))


def test_cifar_loss_sum_and_training(cifar_dir):
    task = get_task("cifar10-resnet", data_dir=cifar_dir, width=0.125, augment=False, train_subset=32)
    assert task.num_examples("train") == 32 and task.num_examples("eval") == 12
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.get_batch("train", torch.arange(32))
    model.eval()
    loss_sum, sums = task.loss(model, batch)
    logits = model(batch.tensors["x"])
    torch.testing.assert_close(loss_sum / batch.weight, F.cross_entropy(logits, batch.tensors["y"]))
    assert 0 <= float(sums["accuracy"]) <= 32
    model.train()
    losses = fit_steps(task, model, batch, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 8)
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------
# bert-mlm


@pytest.fixture(scope="module")
def bert_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("largebatch-cache")
        mp.setenv("LARGEBATCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def bert(bert_cache):
    import largebatch.train.tasks.bert as bert_module

    before = bert_module.TOKENIZER_TRAININGS
    task = get_task("bert-mlm")
    assert bert_module.TOKENIZER_TRAININGS == before + 1  # fresh cache: trained once
    return task


def test_bert_split_by_work(bert):
    from largebatch.train.tasks.bert import split_works

    assert bert.eval_works == ["hamlet", "macbeth", "sonnets", "twelfth_night"]
    assert len(bert.train_works) == 38 and not set(bert.train_works) & set(bert.eval_works)
    assert 9000 < bert.num_examples("train") < 11000 and 900 < bert.num_examples("eval") < 1400
    assert 3000 < bert.vocab_size <= 4096
    names = [f"w{i:02d}" for i in range(25)]
    assert split_works(names)[1] == ["w09", "w19"]
    assert split_works(["a", "b", "c"])[1] == ["c"]
    assert split_works(["a", "b", "c"], ["a"]) == (["b", "c"], ["a"])
    with pytest.raises(ValueError, match="not in the corpus"):
        split_works(["a", "b"], ["z"])


def test_bert_tokenizer_cache_is_reused(bert, bert_cache):
    import largebatch.train.tasks.bert as bert_module

    assert bert.tokenizer_path.parent == bert_cache and bert.tokens_path.parent == bert_cache
    mtimes = (bert.tokenizer_path.stat().st_mtime_ns, bert.tokens_path.stat().st_mtime_ns)
    before = bert_module.TOKENIZER_TRAININGS
    again = get_task("bert-mlm", seq_len=512, train_subset=4)
    assert bert_module.TOKENIZER_TRAININGS == before
    assert again.tokenizer_path == bert.tokenizer_path and again.tokens_path == bert.tokens_path
    assert (bert.tokenizer_path.stat().st_mtime_ns, bert.tokens_path.stat().st_mtime_ns) == mtimes
    assert again.tokenizer.to_str() == bert.tokenizer.to_str()
    assert not list(bert_cache.glob("*.tmp"))


def test_bert_cache_key_covers_vocab_size_and_corpus(bert_cache, tmp_path):
    import shutil

    import largebatch.train.tasks.bert as bert_module
    from largebatch.train.data import default_data_dir

    works = default_data_dir() / "shakespeare" / "works"
    for name in ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"):
        shutil.copy(works / f"{name}.txt.gz", tmp_path)
    options = dict(data_dir=tmp_path, seq_len=32, eval_works="phoenix_and_the_turtle")
    before = bert_module.TOKENIZER_TRAININGS
    small = get_task("bert-mlm", vocab_size=300, **options)
    assert small.eval_works == ["phoenix_and_the_turtle"] and small.vocab_size == 300
    get_task("bert-mlm", vocab_size=300, **options)
    assert bert_module.TOKENIZER_TRAININGS == before + 1
    get_task("bert-mlm", vocab_size=400, **options)
    assert bert_module.TOKENIZER_TRAININGS == before + 2
    (tmp_path / "lovers_complaint.txt.gz").unlink()
    get_task("bert-mlm", vocab_size=300, **options)
    assert bert_module.TOKENIZER_TRAININGS == before + 3


def test_bert_sequences(bert):
    from largebatch.train.tasks.bert import CLS_ID, SEP_ID

    ids = bert._ids["train"]
    assert ids.shape[1] == 128 and bool((ids[:, 0] == CLS_ID).all()) and bool((ids[:, -1] == SEP_ID).all())
    assert bool((ids[:, 1:-1] >= 5).logical_or(ids[:, 1:-1] == 1).all())  # only [UNK] among specials
    text = bert.tokenizer.decode(ids[0, 1:-1].tolist())
    assert text.startswith("all ' s well that ends well")  # the first training work, lower-cased


def test_bert_masking_statistics(bert):
    from largebatch.train.tasks.bert import MASK_ID

    ids = bert._ids["train"][:512]
    batch = bert.get_batch("train", torch.arange(512), gen(0))
    input_ids, index, labels = (batch.tensors[k] for k in ("input_ids", "masked_index", "masked_labels"))
    assert batch.weight == index.numel() == labels.numel()
    selected = torch.zeros(ids.numel(), dtype=torch.bool)
    selected[index] = True
    selected = selected.view_as(ids)
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert bool(selected.any(dim=1).all())
    assert abs(batch.weight / (512 * 126) - 0.15) < 0.005
    torch.testing.assert_close(labels, ids.reshape(-1)[index])
    # Unselected positions are untouched; selected ones are 80% [MASK], 10% random, 10% unchanged.
    assert torch.equal(input_ids[~selected], ids[~selected])
    new = input_ids.reshape(-1)[index]
    frac_mask = float((new == MASK_ID).float().mean())
    frac_same = float((new == labels).float().mean())
    assert abs(frac_mask - 0.8) < 0.015
    assert abs(frac_same - 0.1 - 1 / bert.vocab_size) < 0.01  # a random token can hit the original
    assert abs(1 - frac_mask - frac_same - 0.1) < 0.01


def test_bert_mask_fallback_selects_one_per_row():
    from largebatch.train.tasks.bert import mask_tokens

    ids = torch.randint(5, 100, (50, 16), generator=gen(0))
    ids[:, 0], ids[:, -1] = 2, 3
    _, labels = mask_tokens(ids, gen(1), vocab_size=100, mask_prob=1e-6)
    assert ((labels != -100).sum(dim=1) == 1).all()
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()


def test_bert_train_masks_do_not_depend_on_the_split(bert):
    """A step's generator goes to every micro-batch and rank; masks are drawn per example, so one
    batch of 12 and the same examples as 5 + 7 (or in another order) get the same masks."""
    idx = torch.tensor([7, 3, 100, 4, 9, 11, 0, 1, 2, 5, 6, 8])
    whole = bert.get_batch("train", idx, gen(11)).tensors["input_ids"]
    parts = torch.cat([bert.get_batch("train", part, gen(11)).tensors["input_ids"] for part in (idx[:5], idx[5:])])
    assert torch.equal(whole, parts)
    order = torch.argsort(idx)
    assert torch.equal(bert.get_batch("train", idx[order], gen(11)).tensors["input_ids"], whole[order])


def test_bert_get_batch_deterministic(bert):
    idx = torch.tensor([7, 3, 100, 4])
    assert batches_equal(bert.get_batch("train", idx, gen(11)), bert.get_batch("train", idx, gen(11)))
    assert not batches_equal(bert.get_batch("train", idx, gen(11)), bert.get_batch("train", idx, gen(12)))
    # Eval masks are fixed at construction: independent of generator and batch composition.
    e1 = bert.get_batch("eval", torch.arange(8), gen(0))
    e2 = bert.get_batch("eval", torch.arange(8), gen(99))
    assert batches_equal(e1, e2)
    part = bert.get_batch("eval", torch.arange(4, 8), None)
    assert torch.equal(part.tensors["input_ids"], e1.tensors["input_ids"][4:])
    assert e1.weight > 0


def test_bert_loss_matches_hf_mean_loss(bert):
    torch.manual_seed(0)
    model = bert.build_model().eval()
    batch = bert.get_batch("train", torch.arange(6), gen(5))
    loss_sum, sums = bert.loss(model, batch)
    assert torch.isfinite(loss_sum) and loss_sum.ndim == 0
    labels = torch.full_like(batch.tensors["input_ids"], -100).view(-1)
    labels[batch.tensors["masked_index"]] = batch.tensors["masked_labels"]
    out = model(input_ids=batch.tensors["input_ids"], labels=labels.view_as(batch.tensors["input_ids"]))
    torch.testing.assert_close(loss_sum / batch.weight, out.loss, rtol=1e-5, atol=1e-5)
    correct = (out.logits.view(-1, bert.vocab_size)[batch.tensors["masked_index"]].argmax(-1) == batch.tensors["masked_labels"]).sum()
    assert float(sums["accuracy"]) == float(correct)


def test_bert_training_reduces_loss(bert):
    torch.manual_seed(0)
    model = bert.build_model()
    batch = bert.get_batch("train", torch.arange(8), gen(0))
    losses = fit_steps(bert, model, batch, torch.optim.Adam(model.parameters(), lr=3e-3), 8)
    assert losses[-1] < 0.8 * losses[0]


def test_bert_evaluate_independent_of_batch_size(bert):
    task = get_task("bert-mlm", eval_subset=24)
    torch.manual_seed(0)
    model = task.build_model()
    a, b = task.evaluate(model, batch_size=24), task.evaluate(model, batch_size=5)
    assert a.keys() == {"loss", "accuracy"}
    assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["accuracy"] - b["accuracy"]) < 1e-9
    assert 7.0 < a["loss"] < 9.5  # about log(vocab) for an untrained model


def test_bert_config_options(bert, tmp_path):
    task = get_task("bert-mlm", layers=3, hidden=64, heads=4, train_subset=4, eval_subset=4)
    cfg = task.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (3, 64, 4, 256)
    assert cfg.vocab_size == bert.vocab_size and cfg.max_position_embeddings == 512
    path = tmp_path / "bert.json"
    path.write_text(json.dumps({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}))
    task = get_task("bert-mlm", config=str(path), seq_len=64, train_subset=4)
    assert (task.config.num_hidden_layers, task.config.intermediate_size) == (1, 48)
    with pytest.raises(ValueError, match="seq_len must be between 8 and max_position_embeddings=64"):
        get_task("bert-mlm", config=str(path), seq_len=128)


def test_bert_seq_len_512(bert):
    task = get_task("bert-mlm", seq_len=512, train_subset=8)
    assert task.num_examples("train") == 8
    assert 2000 < get_task("bert-mlm", seq_len=512).num_examples("train") < 3000
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.get_batch("train", torch.arange(2), gen(0))
    assert batch.tensors["input_ids"].shape == (2, 512) and 100 < batch.weight < 200
    loss_sum, _ = task.loss(model, batch)
    assert torch.isfinite(loss_sum)


def test_bert_parameter_names_allow_exclusions(bert):
    model = bert.build_model()
    names = [n for n, _ in model.named_parameters()]
    assert any("LayerNorm" in n for n in names) and any(n.endswith(".bias") for n in names)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    pickle.dumps(model.state_dict())


# Bad model shapes are refused before any data work: a missing data_dir is never reached.
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(layers=-1), "layers must be an integer >= 1, got -1"),
        (dict(layers="0"), "layers must be an integer >= 1, got 0"),
        (dict(intermediate=0), "intermediate must be an integer >= 1, got 0"),
        (dict(intermediate="-1"), "intermediate must be an integer >= 1, got -1"),
        (dict(heads=0), "heads must be an integer >= 1, got 0"),
        (dict(hidden=0), "hidden must be an integer >= 1, got 0"),
        (dict(hidden="-8"), "hidden must be an integer >= 1, got -8"),
        (dict(layers="1.5"), "layers must be an integer, got 1.5"),
        (dict(heads=3), "hidden size 128 (hidden, the default) must be divisible by the number of attention heads 3 "
                        "(heads); for hidden size 128, heads may be 1, 2, 4, 8, 16, 32, 64, 128"),
        (dict(hidden=100, heads=8), "hidden size 100 (hidden) must be divisible by the number of attention heads 8 "
                                    "(heads); for hidden size 100, heads may be 1, 2, 4, 5, 10, 20, 25, 50, 100"),
        (dict(config=[1, 2]), "config must be a dict, a BertConfig or a JSON file path, got [1, 2]"),
    ],
)
def test_bert_refuses_bad_shape_options(tmp_path, options, message):
    with pytest.raises(ValueError) as info:
        get_task("bert-mlm", data_dir=tmp_path / "no-corpus", **options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "BERT config file {path} must hold a JSON object of BertConfig fields (e.g. {{\"hidden_size\": 128}}), "
                 "got a JSON list"),
        ("not json", None),
        ({"hidden_size": "64"}, "hidden_size in config file {path} must be an integer >= 1, got '64'"),
        ({"hidden_size": 64.0}, "hidden_size in config file {path} must be an integer >= 1, got 64.0"),
        ({"num_hidden_layers": 0}, "num_hidden_layers in config file {path} must be an integer >= 1, got 0"),
        ({"intermediate_size": -1}, "intermediate_size in config file {path} must be an integer >= 1, got -1"),
        ({"max_position_embeddings": 0}, "max_position_embeddings in config file {path} must be an integer >= 1, got 0"),
        ({"type_vocab_size": True}, "type_vocab_size in config file {path} must be an integer >= 1, got True"),
        ({"hidden_size": 64, "num_attention_heads": 3},
         "hidden size 64 (hidden_size in config file {path}) must be divisible by the number of attention heads 3 "
         "(num_attention_heads in config file {path}); for hidden size 64, heads may be 1, 2, 4, 8, 16, 32, 64"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob in config file {path} must be a probability in [0, 1), got 1.0"),
        ({"attention_probs_dropout_prob": -0.1},
         "attention_probs_dropout_prob in config file {path} must be a probability in [0, 1), got -0.1"),
        ({"classifier_dropout": "0.1"},
         "classifier_dropout in config file {path} must be a probability in [0, 1) or null, got '0.1'"),
        ({"layer_norm_eps": 0}, "layer_norm_eps in config file {path} must be a number > 0, got 0"),
        ({"initializer_range": -0.02}, "initializer_range in config file {path} must be a number >= 0, got -0.02"),
        ({"pad_token_id": -1}, "pad_token_id in config file {path} must be an integer >= 0 (a token id) or null, got -1"),
        ({"is_decoder": True}, "is_decoder in config file {path} must be false (bert-mlm trains a bidirectional encoder), got True"),
        ({"vocab_size": 50}, "vocab_size in config file {path} must be at least 100, got 50"),
        ({"use_cache": "yes"}, "invalid BERT config file {path}: Validation error for field 'use_cache': "
                               "TypeError: Field 'use_cache' expected bool, got str (value: 'yes')"),
    ],
)
def test_bert_refuses_bad_config_values(tmp_path, config, message):
    path = tmp_path / "bert.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ValueError) as info:
        get_task("bert-mlm", data_dir=tmp_path / "no-corpus", config=str(path))
    if message is None:
        assert str(info.value).startswith(f"BERT config file {path} is not valid JSON: Expecting value")
    else:
        assert str(info.value) == message.format(path=path)


def test_bert_refuses_unknown_activation(tmp_path):
    from transformers.activations import ACT2FN

    from largebatch.train.tasks.bert import bert_activations

    assert bert_activations() == sorted(ACT2FN) and {"gelu", "relu", "gelu_new", "tanh"} <= set(bert_activations())
    path = tmp_path / "bert.json"
    path.write_text(json.dumps({"hidden_act": "nope"}))
    with pytest.raises(ValueError) as info:
        get_task("bert-mlm", data_dir=tmp_path / "no-corpus", config=str(path))
    assert str(info.value) == f"hidden_act in config file {path} must be one of {', '.join(sorted(ACT2FN))}; got 'nope'"
    with pytest.raises(ValueError, match=r"^hidden_act in config must be one of gelu, .*; got None$"):
        get_task("bert-mlm", data_dir=tmp_path / "no-corpus", config={"hidden_act": None})
    # An option overrides the config, and the message names the option that set the bad value.
    with pytest.raises(ValueError, match=r"^heads must be an integer >= 1, got 0$"):
        get_task("bert-mlm", data_dir=tmp_path / "no-corpus", config={"num_attention_heads": 4}, heads="0")


def test_bert_cli_reports_bad_shape_in_one_line(tmp_path, capsys):
    from largebatch import cli

    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    base = ["train", "--task", "bert-mlm", "--task-option", f"data_dir={tmp_path / 'no-corpus'}", "--max-steps", "1"]
    for option, message in (("layers=-1", "layers must be an integer >= 1, got -1"),
                            ("hidden=0", "hidden must be an integer >= 1, got 0"),
                            (f"config={path}", f"BERT config file {path} must hold a JSON object")):  # fmt: skip
        assert cli.main(base + ["--task-option", option]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err, err


def test_bert_valid_config_values_still_build(bert_cache, tmp_path):
    import shutil

    from largebatch.train.data import default_data_dir

    works = default_data_dir() / "shakespeare" / "works"
    for name in ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"):
        shutil.copy(works / f"{name}.txt.gz", tmp_path)
    options = dict(data_dir=tmp_path, seq_len=32, vocab_size=300, eval_works="phoenix_and_the_turtle", train_subset=4)
    config = {"hidden_size": 48, "num_attention_heads": 3, "hidden_act": "relu", "hidden_dropout_prob": 0,
              "classifier_dropout": None, "initializer_range": 1, "layer_norm_eps": 1e-5, "pad_token_id": None}  # fmt: skip
    task = get_task("bert-mlm", layers=1, config=config, **options)
    cfg = task.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (1, 48, 3, 192)
    assert (cfg.hidden_act, cfg.hidden_dropout_prob, cfg.initializer_range, cfg.pad_token_id) == ("relu", 0, 1.0, None)
    torch.manual_seed(0)
    loss_sum, _ = task.loss(task.build_model(), task.get_batch("train", torch.arange(2), gen(0)))
    assert torch.isfinite(loss_sum)
    with pytest.raises(ValueError) as info:
        get_task("bert-mlm", config={"pad_token_id": 300}, **options)
    assert str(info.value) == "pad_token_id in config must be a token id below the vocabulary size 300, got 300"
