"""LoRA setup and adapter files: identity at attach, exact detach, save → load, mismatches, corrupt files."""

import numpy as np
import pytest
import torch

from napari_clipsam.models.clipsam import ClipSam, Prompts, tiny_config
from napari_clipsam.training import (AdapterMismatchError, FineTuneConfig, LoraSettings, attach_lora, base_fingerprint,
                                     detach_lora, examples_from_arrays, finetune, load_adapter, read_adapter,
                                     remove_adapter, save_adapter, trainable_report)
from napari_clipsam.training.lora import lora_blocks_of, set_trainable


def _model(strategy="adapter", seed=0, **opts):
    torch.manual_seed(seed)
    return ClipSam(tiny_config(strategy, **opts))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _masks(m, images):
    p = Prompts(torch.tensor([0, 1]), points=torch.tensor([[[20.0, 20.0]], [[40.0, 30.0]]]), labels=torch.ones(2, 1))
    with torch.no_grad():
        enc = m.encode(images, ["nucleus", "nucleus"])
        return m.decode(enc, p)[0], m.semantic_logits(enc)


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        img = rng.normal(100, 5, (64, 64)).astype(np.float32)
        lab = np.zeros((64, 64), np.uint16)
        for k, (y, x) in enumerate([(16, 16), (44, 40)], 1):
            yy, xx = np.mgrid[:64, :64]
            d = (yy - y - 2 * i) ** 2 + (xx - x) ** 2 <= 49
            img[d] += 200
            lab[d] = k
        out += examples_from_arrays(img, lab, "nucleus", name=f"img{i}")
    return out


def test_attach_is_identity_and_detach_exact():
    m = _model()
    images = torch.rand(2, 3, 64, 64)
    before, sem_before = _masks(m, images)
    sd = _state(m)
    blocks = attach_lora(m, LoraSettings(rank=4, blocks="all"))
    assert blocks == (0, 1) and lora_blocks_of(m) == (0, 1)
    after, sem_after = _masks(m, images)
    assert torch.equal(before, after) and torch.equal(sem_before, sem_after)  # B = 0: exactly the base
    set_trainable(m, train_decoder=False)
    rep = trainable_report(m)
    assert rep["lora"] > 0 and rep["decoder"] == 0 and rep["trainable"] == rep["lora"] + rep["conditioning"]
    with pytest.raises(ValueError, match="already has LoRA"):
        attach_lora(m, LoraSettings())
    detach_lora(m)
    assert _same(sd, m.state_dict()) and "peft_config" not in m.__dict__


def test_save_load_identical_masks_and_errors(tmp_path):
    m = _model()
    res = finetune(m, _examples(), FineTuneConfig(steps=3, mode="both", seed=1, lr=1e-2, patience=0, keep_best=False))
    assert not res.cancelled
    path = save_adapter(tmp_path / "cells.safetensors", m, metadata={"note": "test"})
    with pytest.raises(FileExistsError):
        save_adapter(path, m)
    save_adapter(path, m, metadata={"note": "test"}, overwrite=True)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    from napari_clipsam.models.checkpoints import NEW_FILE_MODE

    assert path.stat().st_mode & 0o777 == NEW_FILE_MODE
    meta, tensors = read_adapter(path)
    assert meta["texts"] == ["nucleus"] and meta["strategy"] == "adapter" and meta["user"] == {"note": "test"}
    assert meta["lora"]["rank"] == 8 and meta["base"]["fingerprint"] == base_fingerprint(m)
    assert meta["training"]["summary"]["steps"] == 3
    assert any(".lora_A." in k for k in tensors) and not any(k.startswith("sam.image_encoder.") and "lora" not in k
                                                           for k in tensors)

    images = torch.rand(2, 3, 64, 64)
    want, want_sem = _masks(m, images)
    fresh = _model()  # same base weights (same seed)
    base_out, _ = _masks(fresh, images)
    assert not torch.equal(base_out, want)  # training changed something
    load_adapter(path, fresh)
    got, got_sem = _masks(fresh, images)
    assert torch.equal(got, want) and torch.equal(got_sem, want_sem)
    # loading again (replacing the adapter) is idempotent; removing it gives the base back
    load_adapter(path, fresh)
    assert torch.equal(_masks(fresh, images)[0], want)
    remove_adapter(fresh)
    assert torch.equal(_masks(fresh, images)[0], base_out)

    other_base = _model(seed=5)
    sd = _state(other_base)
    with pytest.raises(AdapterMismatchError, match=r"trained on a ClipSam on SAM tiny built in memory \(hash [0-9a-f]{12}.*"
                       r"current base is .*load it onto the model it was trained on"):
        load_adapter(path, other_base)
    assert _same(sd, other_base.state_dict())
    with pytest.raises(AdapterMismatchError, match="strategy 'adapter'.*'ssp'"):
        load_adapter(path, _model("ssp"))
    import dataclasses

    torch.manual_seed(0)
    other_texts = ClipSam(dataclasses.replace(m.config, templates=("a photo of {}",)))
    with pytest.raises(AdapterMismatchError, match="templates .* its texts would be read differently"):
        load_adapter(path, other_texts)
    # bases saved as files are named by their file, and the hint is a --model that loads it
    fresh.save(tmp_path / "base_a.safetensors")
    other_base.save(tmp_path / "base_b.safetensors")
    a = ClipSam.load(tmp_path / "base_a.safetensors")
    finetune(a, _examples(), FineTuneConfig(steps=1, seed=1, patience=0, autocast=False))
    on_a = save_adapter(tmp_path / "on_a.safetensors", a)
    with pytest.raises(AdapterMismatchError, match="trained on base_a.safetensors .*current base is base_b.safetensors"
                                                   ".*load it with --model base_a.safetensors"):
        load_adapter(on_a, ClipSam.load(tmp_path / "base_b.safetensors"))

    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tmp_path / "trunc.safetensors", _model())
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum|corrupt"):
        load_adapter(tmp_path / "flip.safetensors", _model())
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tmp_path / "junk.safetensors", _model())


def test_training_a_loaded_adapter_further_keeps_its_lora_settings(tmp_path, caplog):
    """A colleague's rank-4 adapter trained further with the default config (rank 8, alpha 16):
    training goes on with the loaded layers, and the saved file records them, so it loads and
    gives the same masks."""
    first = _model()
    finetune(first, _examples(), FineTuneConfig(steps=2, seed=1, patience=0, autocast=False, lora_rank=4, lora_alpha=8.0,
                                                lora_blocks="all"))
    theirs = save_adapter(tmp_path / "theirs.safetensors", first)
    m = _model()
    load_adapter(theirs, m)
    with caplog.at_level("WARNING", logger="napari_clipsam.training.finetune"):
        res = finetune(m, _examples(), FineTuneConfig(steps=2, seed=2, patience=0, autocast=False, lr=1e-2))
    assert "already has LoRA (rank 4, alpha 8" in caplog.text
    assert (res.config.lora_rank, res.config.lora_alpha, tuple(res.config.lora_blocks)) == (4, 8.0, (0, 1))
    mine = save_adapter(tmp_path / "mine.safetensors", m)
    meta, _ = read_adapter(mine)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "blocks": [0, 1], "dropout": 0.0}
    images = torch.rand(2, 3, 64, 64)
    fresh = _model()
    load_adapter(mine, fresh)
    assert torch.equal(_masks(fresh, images)[0], _masks(m, images)[0])
    assert not torch.equal(_masks(fresh, images)[0], _masks(first, images)[0])  # the second run trained


def _flags(m):
    return ({n: p.requires_grad for n, p in m.named_parameters()}, {n: x.training for n, x in m.named_modules()})


def _damaged(src, dst, drop_lora=False):
    """A copy of an adapter file with a valid checksum but a damaged strategy tensor or a LoRA factor missing."""
    import json

    from napari_clipsam.models.checkpoints import write_safetensors
    from napari_clipsam.training.adapter_file import FORMAT, weights_digest

    meta, tensors = read_adapter(src)
    if drop_lora:
        tensors.pop(next(k for k in tensors if "lora_A" in k))
    else:
        tensors[next(k for k in tensors if k.startswith("conditioning."))] = torch.zeros(3, 3)
    meta["weights_sha256"] = weights_digest(tensors)
    write_safetensors(dst, tensors, {"format": FORMAT, "adapter": json.dumps(meta)})
    return dst


def test_a_failed_load_leaves_the_loaded_adapter_exactly_as_it_was(tmp_path):
    """The model carries adapter A (rank 8, block 1); loading a damaged B (rank 4, all blocks) fails
    after A's LoRA layers were swapped for B's: A comes back, weights, flags and all."""
    a = _model()
    finetune(a, _examples(), FineTuneConfig(steps=2, lora_rank=8, lora_dropout=0.1))
    save_adapter(tmp_path / "a.safetensors", a)
    b = _model()
    finetune(b, _examples(), FineTuneConfig(steps=2, lora_rank=4, lora_blocks="all"))
    save_adapter(tmp_path / "b.safetensors", b)
    for bad, error in ((_damaged(tmp_path / "b.safetensors", tmp_path / "b_bad.safetensors"), "do not fit"),
                       (_damaged(tmp_path / "b.safetensors", tmp_path / "b_nolora.safetensors", True), "LoRA weights missing")):
        m = _model()
        load_adapter(tmp_path / "a.safetensors", m)
        state, flags, blocks = _state(m), _flags(m), lora_blocks_of(m)
        with pytest.raises(ValueError, match=error):
            load_adapter(bad, m)
        assert _same(_state(m), state) and _flags(m) == flags and lora_blocks_of(m) == blocks
        assert not any(p.requires_grad for n, p in m.named_parameters() if ".lora_" in n)


def test_merging_lora_ends_the_adapter_and_the_base_fingerprint_sees_it(tmp_path):
    from napari_clipsam.training import merge_lora

    m = _model()
    finetune(m, _examples(), FineTuneConfig(steps=2))
    torch.nn.init.normal_(next(iter(m.conditioning.parameters())))  # not the base any more either way
    with torch.no_grad():
        for name, t in m.state_dict(keep_vars=True).items():
            if name.endswith("lora_B.default.weight"):
                t.data.normal_()  # a LoRA update that changes the weights once merged
    save_adapter(tmp_path / "a.safetensors", m)
    before = base_fingerprint(m)
    merge_lora(m)
    assert base_fingerprint(m) != before  # peft merges through .data: no version counter moves
    assert getattr(m, "clipsam_adapter", None) is None
    with pytest.raises(ValueError, match="no fine-tuned adapter"):
        save_adapter(tmp_path / "b.safetensors", m)
    with pytest.raises(AdapterMismatchError):  # applying it again would add the update twice
        load_adapter(tmp_path / "a.safetensors", m)
    edited = _model()
    base_fingerprint(edited)
    edited.sam.image_encoder.patch_embed.proj.weight.data.mul_(2)
    assert base_fingerprint(edited) != base_fingerprint(_model())


def test_an_adapter_without_decoder_or_strategy_needs_the_base_ones(tmp_path):
    m = _model()
    finetune(m, _examples(), FineTuneConfig(steps=2, train_conditioning=False))
    save_adapter(tmp_path / "a.safetensors", m)
    load_adapter(tmp_path / "a.safetensors", _model())  # the same base: fine
    meta = read_adapter(tmp_path / "a.safetensors")[0]
    assert not meta["train_conditioning"] and meta["train_decoder"] and meta["base"]["uncarried_sha256"]
    other = _model()
    with torch.no_grad():
        next(iter(other.conditioning.parameters())).add_(1.0)  # same encoder and CLIP, another strategy
    with pytest.raises(AdapterMismatchError, match="does not carry the strategy weights"):
        load_adapter(tmp_path / "a.safetensors", other)


def test_training_and_loading_leave_requires_grad_as_it_was_and_new_lora_frozen(tmp_path):
    m = _model()
    m.sam.prompt_encoder.requires_grad_(False)  # the user's own choice of flags, kept by name
    before = {n.replace(".base_layer", ""): p.requires_grad for n, p in m.named_parameters()}
    finetune(m, _examples(), FineTuneConfig(steps=2))
    save_adapter(tmp_path / "a.safetensors", m)
    fresh = _model()
    fresh.sam.prompt_encoder.requires_grad_(False)
    load_adapter(tmp_path / "a.safetensors", fresh)
    for model in (m, fresh):
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        assert any(".lora_" in n for n in flags)
        assert all(not f for n, f in flags.items() if ".lora_" in n)
        assert {n.replace(".base_layer", ""): f for n, f in flags.items() if ".lora_" not in n} == before
