"""Weighted mixtures of prepared data dirs (relora_ds.data.mixture): the windows an epoch takes from each
member (counted against the weights by hand), the walk of a down-weighted member through all its windows over
epochs, the sampler on a mixture (shards, prefetch and exact resume against the uninterrupted order), the
mixture dir (its windows are its members' tokens), the refusals, and a training run on one."""
import collections
import json
import warnings

import numpy as np
import pytest
import torch

from trainer_utils import Windows, packed_data_dir


def reads(ds, positions):
    rows = ds.get_batch(positions)
    return [(int(r[0]), int(r[1])) for r in rows]


def test_an_epoch_takes_each_member_in_its_weights_share():
    from relora_ds.data.mixture import MixedWindows

    mix = MixedWindows([Windows(0, 10), Windows(1, 30)], [1.0, 1.0], seed=3)
    assert len(mix) == 40 and mix.quotas.tolist() == [20, 20]  # N = 10 + 30, shares 1/2 each
    for epoch in range(3):
        got = collections.Counter(reads(mix.epoch_view(epoch), range(40)))
        small = {w: c for (s, w), c in got.items() if s == 0}
        big = {w: c for (s, w), c in got.items() if s == 1}
        assert small == {w: 2 for w in range(10)}  # up-weighted 2x: every window twice per epoch
        assert sum(big.values()) == 20 and set(big.values()) <= {1, 2}
    # The down-weighted member walks on: epochs 0-2 take 60 = 2 x 30 of its windows, each exactly twice.
    walk = collections.Counter(w for e in range(3) for s, w in reads(mix.epoch_view(e), range(40)) if s == 1)
    assert walk == {w: 2 for w in range(30)}
    # and epoch 0 alone (20 of 30) takes 20 distinct windows: a shuffle, not the member's first 20 in order
    first = [w for s, w in reads(mix, range(40)) if s == 1]
    assert len(set(first)) == 20 and sorted(first) != list(range(20))


def test_an_up_weighted_member_reads_each_window_floor_or_ceil_times_in_every_epoch():
    """q/n not whole (12 positions for 10 windows): each epoch reads every window once or twice, two of them
    twice (a review found a stream carried across epochs leaving windows unread in an epoch); the epochs'
    extra windows differ. The mixture also pickles (a DataLoader's workers) and reads the same after."""
    import pickle

    from relora_ds.data.mixture import MixedWindows

    mix = MixedWindows([Windows(0, 10), Windows(1, 14)], [12, 12], seed=1)
    assert mix.quotas.tolist() == [12, 12]
    extra = []
    for epoch in range(4):
        got = collections.Counter(w for s, w in reads(mix.epoch_view(epoch), range(24)) if s == 0)
        assert sorted(got) == list(range(10)) and sorted(got.values()) == [1] * 8 + [2] * 2, (epoch, got)
        extra.append(sorted(w for w, c in got.items() if c == 2))
    assert len({tuple(e) for e in extra}) > 1
    assert sorted(mix._tables) == [2, 3]  # each epoch's table built once, the newest two kept (memory)
    copy = pickle.loads(pickle.dumps(mix))
    assert reads(copy.epoch_view(3), range(24)) == reads(mix.epoch_view(3), range(24))


def test_weights_proportional_to_sizes_read_each_window_once_and_rounding_is_largest_remainder():
    from relora_ds.data.mixture import MixedWindows

    mix = MixedWindows([Windows(0, 7), Windows(1, 5), Windows(2, 1)], [7, 5, 1])
    assert sorted(reads(mix.epoch_view(4), range(13))) == [(0, w) for w in range(7)] + [(1, w) for w in range(5)] \
        + [(2, 0)]
    # 0.5 / 0.3 / 0.2 of N = 11: 5.5, 3.3, 2.2 -> floors 5, 3, 2 and the one left to the largest remainder (.5)
    assert MixedWindows([Windows(0, 4), Windows(1, 4), Windows(2, 3)], [5, 3, 2]).quotas.tolist() == [6, 3, 2]


def test_the_mixture_is_a_pure_function_of_sizes_weights_and_seed():
    from relora_ds.data.mixture import MixedWindows

    def make(seed):
        return MixedWindows([Windows(0, 50), Windows(1, 80)], [0.3, 0.7], seed=seed)
    a, b, c = make(1), make(1), make(2)
    for epoch in (0, 5):
        assert reads(a.epoch_view(epoch), range(130)) == reads(b.epoch_view(epoch), range(130))
    assert reads(a.epoch_view(5), range(130)) != reads(c.epoch_view(5), range(130))


def test_the_sampler_on_a_mixture_shards_prefetches_and_resumes_exactly():
    """2 ranks x 3 micro-batches of 4 per step, across epoch boundaries: the ranks' batches together are each
    epoch's mixture (its multiset: the positions' shuffle changes the order only); a sampler read with
    prefetch, and one resumed from a state_dict mid-epoch and after a boundary, give the uninterrupted batches."""
    from relora_ds.data import ShardedBatches
    from relora_ds.data.mixture import MixedWindows

    mix = MixedWindows([Windows(0, 9), Windows(1, 40)], [0.5, 0.5], seed=7)  # N = 49: 48 per epoch, 2 steps
    kw = dict(rank=0, world_size=2, seed=11, accumulation_steps=3)

    def run(rank, n, prefetch=0, state=None):
        s = ShardedBatches(mix, 4, **{**kw, "rank": rank}, prefetch=prefetch)
        if state is not None:
            s.load_state_dict(state)
        out = [reads_rows(next(s)) for _ in range(n)]
        st = s.state_dict()
        s.close()
        return out, st

    def reads_rows(batch):
        return [(int(r[0]), int(r[1])) for r in batch]

    ranks = [run(r, 12)[0] for r in range(2)]
    for epoch in range(2):  # 6 micro-batches per epoch and rank
        got = collections.Counter(w for r in range(2) for b in ranks[r][6 * epoch:6 * epoch + 6] for w in b)
        order = np.random.default_rng([11, epoch]).permutation(49)[:48]  # the sampler's epoch order, tail cut
        assert got == collections.Counter(reads(mix.epoch_view(epoch), order))
    assert run(0, 12, prefetch=3)[0] == ranks[0]
    for k in (3, 6, 9):  # checkpoints come at step boundaries (3 micro-batches): mid-epoch 0, at the boundary, epoch 1
        _, state = run(0, k)
        assert run(0, 12 - k, state=state)[0] == ranks[0][k:]


def _member(tmp_path, name, train, val, corpus):
    return packed_data_dir(tmp_path / name, train, val, corpus=corpus)


def test_a_mixture_dir_reads_its_members_tokens_and_is_refused_when_a_member_changes(tmp_path):
    from relora_ds.data import PackedTokens, load_manifest, make_mixture, open_split
    from relora_ds.data.mixture import MixedWindows, parse_member

    a = _member(tmp_path, "a", 3_300, 330, "corpus-a")
    b = _member(tmp_path, "b", 1_700, 170, "corpus-b")
    mix = make_mixture([parse_member(f"{a}:3"), parse_member(f"{b}:1")], tmp_path / "mix")
    manifest = load_manifest(mix)
    assert manifest["kind"] == "mixture" and [m["weight"] for m in manifest["members"]] == [0.75, 0.25]
    assert manifest["splits"]["train"]["tokens"] == 5_000 and manifest["tokenizer_sha256"] == \
        load_manifest(a)["tokenizer_sha256"] and (mix / "tokenizer.model").read_bytes() == b"stand-in"
    train = open_split(mix, "train", seq_len=32, seed=5)
    assert isinstance(train, MixedWindows) and len(train) == 3_299 // 32 + 1_699 // 32 == 156
    own = [PackedTokens(d, "train", seq_len=32) for d in (a, b)]
    members, windows = train.locate(range(len(train)))
    got = train.get_batch(range(len(train)))
    for i in range(len(train)):  # every window is the member's own window, token for token
        assert torch.equal(got[i], own[members[i]][int(windows[i])])
    assert np.bincount(members).tolist() == train.quotas.tolist() == [117, 39]  # 0.75 x 156
    with pytest.raises(ValueError, match="is a mixture of prepared data dirs, not one: open it with"):
        PackedTokens(mix, "train", seq_len=32)
    assert make_mixture([(a, 3), (b, 1)], tmp_path / "mix") == tmp_path / "mix"  # the same again: a no-op
    with pytest.raises(ValueError, match="holds another mixture; runs trained on it could not resume"):
        make_mixture([(a, 1), (b, 1)], tmp_path / "mix")
    packed_data_dir(b, 1_700, 200, corpus="corpus-b")  # only b's validation split prepared again: the training
    with pytest.raises(ValueError, match=rf"its member {b} was prepared again since the mixture was made"):
        open_split(mix, "validation", seq_len=32)  # fingerprint is unchanged, the split counts are not
    packed_data_dir(b, 1_800, 170, corpus="corpus-b2")  # member b prepared again
    with pytest.raises(ValueError, match=rf"its member {b} was prepared again since the mixture was made"):
        open_split(mix, "train", seq_len=32)
    with pytest.raises(ValueError, match=r"member\(s\) \['b'\] hold no window of seq_len=2048 in their train"):
        MixedWindows([PackedTokens(a, "train", seq_len=2048), PackedTokens(b, "train", seq_len=2048)], [1, 1],
                     names=["a", "b"])


def test_a_moved_member_is_named_and_the_mixture_made_again_reads_the_same_windows(tmp_path):
    """The mixture stores its members' paths relative to itself: a member moved away is named; making the
    mixture again with its new place (same data, same weights) needs no --overwrite and reads the very windows
    it read before, so a run trained on it resumes (a review found the re-make was a silent no-op)."""
    import shutil

    from relora_ds.data import load_manifest, make_mixture, open_split

    a = _member(tmp_path, "a", 900, 200, "corpus-a")
    b = _member(tmp_path, "b", 600, 200, "corpus-b")
    mix = make_mixture([(a, 2), (b, 1)], tmp_path / "mix")
    before = open_split(mix, "train", seq_len=16, seed=3).epoch_view(2).get_batch(range(91))
    (tmp_path / "moved").mkdir()
    shutil.move(b, tmp_path / "moved" / "b")
    with pytest.raises(ValueError, match=r"its member ../b \(.*\) is not a prepared data dir \(moved or deleted\?\)"):
        open_split(mix, "train", seq_len=16)
    make_mixture([(a, 2), (tmp_path / "moved" / "b", 1)], tmp_path / "mix")
    assert [m["path"] for m in load_manifest(mix)["members"]] == ["../a", "../moved/b"]
    assert torch.equal(open_split(mix, "train", seq_len=16, seed=3).epoch_view(2).get_batch(range(91)), before)


def test_data_use_names_a_mixture_member_its_weight_starves_or_too_short_for_a_window():
    """startup.check_data_use on a mixture's manifest splits (before any window is opened): a training member
    whose weight rounds to no window of an epoch, and one shorter than a window at seq_len, are errors naming
    the fix; a validation member shorter than a window is a warning that evaluation leaves it out (it made
    the whole run impossible, a user trial found on 2026-12-05), and its weight does not matter there (each
    member's windows are evaluated on their own)."""
    from relora_ds.startup import check_data_use
    from relora_ds.train_config import ConfigWarning, TrainConfig

    cfg = TrainConfig(model="debug", seq_len=32, cycle_length=4, total_steps=8, micro_batch_size=1,
                      global_batch_size=2, eval_every=4, eval_windows=8)

    def splits(train_b, val_b, weight_b):
        return {name: {"tokens": big + small, "documents": 2,
                       "members": [{"path": "../a", "tokens": big, "weight": 1 - weight_b},
                                   {"path": "../b", "tokens": small, "weight": weight_b}]}
                for name, big, small in (("train", 33_000, train_b), ("validation", 3_300, val_b))}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data_use(cfg, 8, splits(3_300, 330, 0.1), "mix", 1)  # 0.1 of 1,134 windows; 8 evaluated reach b
        check_data_use(cfg, 8, splits(33_000, 330, 0.004), "mix", 1)  # 0.45 of 113 validation windows: fine now
    with pytest.raises(ValueError, match=r"mixture mix: in its train split, member\(s\) ../b \(weight 0.0001\) "
                                         r"get no window of the 2,062 of an epoch at --seq-len 32"):
        check_data_use(cfg, 8, splits(33_000, 330, 0.0001), "mix", 1)
    with pytest.raises(ValueError, match=r"mixture mix: the train split of member\(s\) ../b \(20 tokens\) holds "
                                         r"fewer tokens than one window of --seq-len 32"):
        check_data_use(cfg, 8, splits(20, 330, 0.1), "mix", 1)
    with pytest.warns(ConfigWarning, match=r"^mixture mix: the validation split of member\(s\) ../b \(0 tokens\) "
                                           r"holds fewer tokens than one window .* evaluation leaves them out"):
        check_data_use(cfg, 8, splits(3_300, 0, 0.1), "mix", 1)
    # eval_windows shared out 0.9/0.1 over members of 103 and 10 windows: 100 fits (90/10); 120 asks 108/12, and
    # the evaluation reads all 103 + 10 (it said "uses all 113", a review found: b read 10, not its share 12)
    fits = TrainConfig(**{**cfg.to_dict(), "eval_windows": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data_use(fits, 8, splits(3_300, 330, 0.1), "mix", 1)
    with pytest.warns(ConfigWarning, match=r"^eval_windows=120 shared out by the weights of mixture mix asks more "
                                           r"windows of member\(s\) ../a \(103 windows for its share of 108\), ../b "
                                           r"\(10 windows for its share of 12\) than their validation splits hold: "
                                           r"each evaluation reads all of theirs, 113 windows in all$"):
        check_data_use(TrainConfig(**{**cfg.to_dict(), "eval_windows": 120}), 8, splits(3_300, 330, 0.1), "mix", 1)


def test_an_evaluation_of_a_mixture_leaves_out_a_member_without_validation_windows(tmp_path):
    """open_eval_split: a member whose validation split holds no window is left out with a warning naming it,
    the others' weights renormalized; no member with one is an error. Training on the mixture still reads every
    member (open_split)."""
    from relora_ds.data import DataWarning, MemberSplits, make_mixture, open_eval_split, open_split
    from trainer_utils import packed_data_dir

    a = packed_data_dir(tmp_path / "a", 2_000, 400, corpus="corpus-a")
    b = packed_data_dir(tmp_path / "b", 2_000, 0, corpus="corpus-b")
    c = packed_data_dir(tmp_path / "c", 2_000, 200, corpus="corpus-c")
    mix = make_mixture([(a, 2), (b, 1), (c, 1)], tmp_path / "mix")
    with pytest.warns(DataWarning, match=r"member\(s\) \.\./b \(0 tokens\) hold no window of seq_len=16 in their "
                                         r"validation split, so evaluation leaves them out"):
        val = open_eval_split(mix, seq_len=16)
    assert isinstance(val, MemberSplits) and val.labels == ["a", "c"]
    assert val.shares.tolist() == pytest.approx([2 / 3, 1 / 3]) and val.sizes.tolist() == [399 // 16, 199 // 16]
    assert len(open_split(mix, "train", seq_len=16).sources) == 3
    none = make_mixture([(b, 1), (packed_data_dir(tmp_path / "d", 2_000, 10, corpus="corpus-d"), 1)], tmp_path / "m2")
    with pytest.raises(ValueError, match=r"no member's validation split holds a window of seq_len=16"):
        open_eval_split(none, seq_len=16)


@pytest.mark.parametrize("members, error", [
    (["A:1"], "a mixture needs at least two members"),
    (["A:1", "A:2"], "names a data dir twice"),
    (["A:1", "C:1"], "were tokenized differently .*tokenizer_sha256"),
    (["A:1", "MISSING:1"], "is not a prepared data dir"),
    (["A:1", "MIX:1"], "is itself a mixture"),
])
def test_bad_mixtures_are_named(tmp_path, members, error):
    from relora_ds.data import make_mixture
    from relora_ds.data.mixture import parse_member

    dirs = {"A": _member(tmp_path, "a", 500, 100, "corpus-a"), "B": _member(tmp_path, "b", 500, 100, "corpus-b"),
            "MISSING": tmp_path / "missing"}
    dirs["C"] = _member(tmp_path, "c", 500, 100, "corpus-c")
    (dirs["C"] / "tokenizer.model").write_bytes(b"another")
    manifest = json.loads((dirs["C"] / "manifest.json").read_text())
    (dirs["C"] / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": "f" * 64}))
    dirs["MIX"] = make_mixture([(dirs["A"], 1), (dirs["B"], 1)], tmp_path / "mix")
    with pytest.raises(ValueError, match=error):
        make_mixture([parse_member(f"{dirs[m.split(':')[0]]}:{m.split(':')[1]}") for m in members], tmp_path / "out")


@pytest.mark.parametrize("spec", ["data/c4", "data/c4:0", "data/c4:-1", "data/c4:nan", "data/c4:inf", "data/c4:x", ":1"])
def test_a_member_spec_without_a_positive_weight_is_named(spec):
    from relora_ds.data.mixture import parse_member

    with pytest.raises(ValueError, match=r"is not DIR:WEIGHT with a weight > 0 \(e.g. data/c4:0.8\)"):
        parse_member(spec)
    assert parse_member("/x/y:z/c4:2.5") == ("/x/y:z/c4", 2.5)


def test_prepare_data_mix_command_writes_the_mixture_and_refuses_tokenizing_options(tmp_path):
    import subprocess
    import sys

    from launch_utils import ROOT, launch_env

    a = _member(tmp_path, "a", 500, 100, "corpus-a")
    b = _member(tmp_path, "b", 500, 100, "corpus-b")
    cmd = [sys.executable, str(ROOT / "launch/prepare_data.py"), "--mix", f"{a}:2", f"{b}:1", "--out",
           str(tmp_path / "mix")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["path"] for m in json.loads((tmp_path / "mix" / "manifest.json").read_text())["members"]] == \
        ["../a", "../b"]
    proc = subprocess.run(cmd + ["--vocab-size", "64"], capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    assert proc.returncode != 0 and "--mix combines prepared data dirs and takes only --out and --overwrite; also " \
        "given: --vocab-size" in proc.stderr, proc.stderr[-2000:]


def test_training_on_a_mixture_runs_resumes_and_checks_its_members(tmp_path):
    """launch/train.py on a mixture dir (1 rank): it trains and evaluates on the mixture (and on each member),
    an interrupted run resumed from its checkpoint logs the uninterrupted run's losses, and a member too
    short for a window at the run's seq_len is named before any engine."""
    from relora_ds.data import make_mixture
    from trainer_utils import read_losses, rewind_to, train1

    a = _member(tmp_path, "a", 3_000, 400, "corpus-a")
    b = _member(tmp_path, "b", 1_000, 400, "corpus-b")
    mix = make_mixture([(a, 0.5), (b, 0.5)], tmp_path / "mix")
    full = tmp_path / "full"
    full.mkdir()
    train1(full, mix, total_steps=8, eval_every=4, save_every=4)
    losses, recs = read_losses(full / "run")
    assert sorted(losses) == list(range(1, 9)) and [r["step"] for r in recs if "val_loss" in r] == [4, 8]
    evals = [r for r in recs if "val_loss" in r]  # and each member's own validation loss
    assert all(min(r["val_loss/a"], r["val_loss/b"]) <= r["val_loss"] <= max(r["val_loss/a"], r["val_loss/b"])
               for r in evals)
    rewind_to(full / "run", "step_4")  # as if the job had died after its checkpoint at step 4
    train1(full, mix, "--resume", total_steps=8, eval_every=4, save_every=4)
    resumed, _ = read_losses(full / "run")
    assert resumed == pytest.approx({s: losses[s] for s in range(5, 9)}, rel=1e-6)
    short = tmp_path / "short"
    short.mkdir()
    proc = train1(short, mix, check=False, seq_len=1024, micro_batch_size=1, global_batch_size=1)
    assert proc.returncode == 2 and "the train split of member(s) ../b (1,000 tokens) holds fewer tokens than " \
        "one window of --seq-len 1024" in proc.stderr, proc.stderr[-2000:]


def test_equal_members_shuffle_apart_and_the_mixture_counts_every_members_unknown_pieces(tmp_path):
    """Two members of one size still take their windows in different orders (each member's shuffle seeds on its
    index: without it their orders were one, a mutation no test saw), and a mixture's manifest sums its
    members' unknown-piece counts, which document masking reads (a mutation keeping the first one's went
    unseen)."""
    from relora_ds.data import load_manifest, make_mixture
    from relora_ds.data.manifest import write_manifest
    from relora_ds.data.mixture import MixedWindows

    mixed = MixedWindows([Windows(0, 40), Windows(1, 40)], [0.5, 0.5], seed=3)
    taken = collections.defaultdict(list)
    for source, window in reads(mixed.epoch_view(0), range(80)):
        taken[source].append(window)
    assert sorted(taken[0]) == sorted(taken[1]) == list(range(40)) and taken[0] != taken[1]
    a = _member(tmp_path, "a", 3_300, 330, "corpus-a")
    b = _member(tmp_path, "b", 1_700, 170, "corpus-b")
    manifest = load_manifest(b)
    write_manifest(b, {**manifest, "warnings": {"unk_tokens": 5, "documents_holding_eos": 2}})
    mix = make_mixture([(a, 1), (b, 1)], tmp_path / "mix")
    assert load_manifest(mix)["warnings"] == {"unk_tokens": 5, "documents_holding_eos": 2}


def test_rounding_ties_go_to_the_earlier_member_and_a_split_counts_each_members_windows():
    """Hand-computed: equal weights over 1 + 2 windows share N = 3 as 1.5 / 1.5, the tie's extra position to the
    earlier member (2, 1). split_windows of a mixture's split cuts each member on its own: 30 tokens hold
    (30 - 1) // 16 = 1 window of 16 per member, 2 in all (the 60 tokens together would hold 3). starved_members
    names a member whose weight rounds to no position, never one without a window (that one is too short:
    check_data_use says so). member_labels: dirs' names where unique, else the paths as given."""
    from relora_ds.data.mixture import MixedWindows, member_labels, split_windows, starved_members

    assert MixedWindows([Windows(0, 1), Windows(1, 2)], [1, 1]).quotas.tolist() == [2, 1]
    assert MixedWindows([Windows(0, 2), Windows(1, 1)], [1, 1]).quotas.tolist() == [2, 1]
    split = {"tokens": 60, "members": [{"path": "../a", "tokens": 30, "weight": 0.5},
                                       {"path": "../b", "tokens": 30, "weight": 0.5}]}
    assert split_windows(split, 16) == 2 and split_windows({"tokens": 60}, 16) == 3
    big = {"path": "../a", "tokens": 16_001, "weight": 0.9999}  # 1,000 windows of 16
    assert starved_members({"members": [big, {"path": "../b", "tokens": 161, "weight": 0.0001}]}, 16) == [
        "../b (weight 0.0001)"]  # 10 windows, 0.0001 x 1,010 positions: none
    assert starved_members({"members": [big, {"path": "../b", "tokens": 10, "weight": 0.0001}]}, 16) == []
    assert member_labels(["../data/c4", "../data/code"]) == ["c4", "code"]
    assert member_labels(["../a/c4", "../b/c4"]) == ["../a/c4", "../b/c4"]


def test_mixed_windows_refuse_what_they_cannot_mix_and_name_their_tokens():
    """Sources of different seq_len, and a member whose weight gives it no position of an epoch, are refused;
    a position outside the epoch (negative too) is an IndexError, not another position's window. The mixture's
    tokens are its members' together (the sampler's too-small error names them: 10 + 20 = 30)."""
    from relora_ds.data import ShardedBatches
    from relora_ds.data.mixture import MixedWindows

    with pytest.raises(ValueError, match=r"sources have windows of different seq_len: \['3', '4'\]"):
        MixedWindows([Windows(0, 5, seq_len=3), Windows(1, 5, seq_len=4)], [1, 1])
    with pytest.raises(ValueError, match=r"member\(s\) \['member 1 \(weight 0.0001\)'\] get no window of the 1,010 "
                                         r"in an epoch"):
        MixedWindows([Windows(0, 1000), Windows(1, 10)], [0.9999, 0.0001])
    a, b = Windows(0, 3), Windows(1, 4)
    a.num_tokens, b.num_tokens = 10, 20
    mix = MixedWindows([a, b], [1, 1])
    assert mix.num_tokens == 30
    for bad in (-1, 7):
        with pytest.raises(IndexError, match=rf"window {bad} out of range for 7 windows"):
            mix.get_batch([0, bad])
    with pytest.raises(ValueError, match=r"^the dataset has 7 windows \(30 tokens at seq_len=3\), fewer than"):
        ShardedBatches(mix, 8, rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_make_mixture_refuses_a_weight_that_is_not_finite_and_positive(tmp_path, weight):
    """make_mixture (the API; the CLI's parse_member refuses these too): a weight of 0 would record a member
    that never trains, nan or inf shares that are no shares."""
    from relora_ds.data import make_mixture

    a, b = _member(tmp_path, "a", 500, 100, "corpus-a"), _member(tmp_path, "b", 500, 100, "corpus-b")
    with pytest.raises(ValueError, match=r"mixture weights must be finite and > 0"):
        make_mixture([(a, 1), (b, weight)], tmp_path / "mix")
    assert not (tmp_path / "mix").exists()


def test_a_mixture_written_over_one_of_its_members_is_refused_and_the_member_kept(tmp_path):
    """--out naming a member, even with --overwrite: the member's manifest, tokenizer and token files would be
    replaced by the mixture's (the member lost, and the mixture naming itself)."""
    from relora_ds.data import make_mixture

    a, b = _member(tmp_path, "a", 500, 100, "corpus-a"), _member(tmp_path, "b", 500, 100, "corpus-b")
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    with pytest.raises(ValueError, match=r"is one of the mixture's members: write the mixture to a dir of its own"):
        make_mixture([(a, 1), (b, 1)], a, overwrite=True)
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
