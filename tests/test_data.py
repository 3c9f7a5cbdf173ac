"""Datasets: determinism, sizes from the preset, answers that grade correct, and the build cache."""
import datasets

from paper_lib import artifacts, cards, config, data


def small(**overrides):
    sizes = {"data__sft_size": 64, "data__test_size": 20, "data__loss_set_size": 8}
    return config.load("tiny", **{**sizes, **overrides})


def test_splits_are_deterministic_for_a_seed_and_change_with_it():
    cfg = small()
    assert data.build_splits(cfg) == data.build_splits(cfg)
    other = data.build_splits(small(data__seed=1))
    assert other["sft_train"] != data.build_splits(cfg)["sft_train"]
    assert other["id_test"] == data.build_splits(cfg)["id_test"]  # test sets use data.test_seed


def test_split_sizes_rules_and_answers():
    cfg = small()
    splits = data.build_splits(cfg)
    assert {k: len(v) for k, v in splits.items()} == {"sft_train": 64, "id_test": 20, "ood_test": 20, "ood_loss": 8}
    for name, rows in splits.items():
        rule = "ood" if name.startswith("ood") else "id"
        for row in rows:
            assert row["rule"] == rule
            assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
            answer = row["completion"][0]["content"]
            assert cards.grade_answer(answer, row["numbers"]).status == "CORRECT"
            assert row["numbers"] == [cards.card_value(c, rule) for c in row["cards"]]
            assert row["n_solutions"] == len(cards.solve(row["numbers"])) > 0
    assert all(any(c in "JQK" for c in row["cards"]) for row in splits["ood_test"])


def test_answer_choice_first_takes_the_shortest_solution():
    rows = data.build_splits(small(data__answer_choice="first"))["id_test"]
    assert all(r["formula"] == cards.solve(r["numbers"])[0] for r in rows)


def test_the_answer_choice_never_changes_which_hands_are_drawn():
    """Hands and answers come from two streams: the test sets are the same hands whichever answer SFT
    learns."""
    first, spread = (data.build_splits(small(data__answer_choice=c)) for c in ("first", "random"))
    for name in data.SPLITS:
        assert [r["cards"] for r in first[name]] == [r["cards"] for r in spread[name]]
    assert [r["formula"] for r in first["sft_train"]] != [r["formula"] for r in spread["sft_train"]]


def test_the_upstream_ood_loss_set_is_in_the_authors_format():
    """data.ood_loss_format "upstream": distinct hands, the first solution, numbers as strings, no "=24"."""
    rows = data.build_splits(small(data__ood_loss_format="upstream", data__loss_set_size=40))["ood_loss"]
    assert len(rows) == 40 and len({tuple(r["cards"]) for r in rows}) == 40
    row = rows[0]
    numbers = ", ".join(f"'{n}'" for n in row["numbers"])
    cards_shown = ", ".join(f"'{c}'" for c in row["cards"])
    assert row["formula"] == cards.solve(row["numbers"])[0]
    assert row["completion"][0]["content"] == (
        f'\n{{\n  "cards": [{cards_shown}],\n  "number": [{numbers}],\n  "formula": "{row["formula"]}"\n}}\n')
    prompt = row["prompt"][0]["content"]
    assert prompt.startswith("\n[Task Description]\n") and prompt.endswith("}\n\n")
    assert "count as '11', '12', '13', and each card" in prompt and f"Cards: [{cards_shown}]" in prompt
    assert all(cards.grade_answer(r["completion"][0]["content"], r["numbers"]).status == "CORRECT" for r in rows)


def test_test_sets_use_seed_42_by_default():
    cfg = config.load("qwen7b")
    assert (cfg.data.test_size, cfg.data.test_seed) == (234, 42)
    assert cfg.data.sft_size >= 64 * 1600


def test_build_saves_with_datasets_and_skips_when_unchanged():
    cfg = small()
    path = data.build(cfg)
    assert path == artifacts.data_dir(cfg)
    loaded = datasets.load_from_disk(str(path))
    assert set(loaded) == set(data.SPLITS)
    assert loaded["sft_train"].to_list() == [dict(r) for r in data.build_splits(cfg)["sft_train"]]
    stamp = (path / "manifest.json").stat().st_mtime_ns
    data.build(cfg)
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    data.build(cfg, force=True)
    assert (path / "manifest.json").stat().st_mtime_ns != stamp
    bigger = small(data__sft_size=65)
    data.build(bigger)
    assert len(data.load(bigger)["sft_train"]) == 65


def test_solvable_share_is_exact_over_raw_draws():
    share = data.solvable_share("ood")
    assert 0 < share < 1
    assert share * 13 ** 3 * 3 == round(share * 13 ** 3 * 3)  # a count over all 6591 OOD draws


def test_upstream_test_hands_are_the_ones_upstreams_evaluator_played():
    """data.test_hands upstream replays upstream's env from seed 42: its constructor's hand is skipped and
    each reset also draws four suits and its solver's shuffle. The hands below are what upstream's own
    general_points_oneline.py gave (run on 2026-12-07 with gymnasium and the card images stubbed out,
    random.seed(42), GeneralPointEnv_oneline(...), 234 x reset(seed=42)); all 234 of each rule matched."""
    expected = {"id": [["K", "5", "2", "4"], ["7", "5", "2", "4"], ["A", "Q", "Q", "5"]],
                "ood": [["Q", "2", "7", "6"], ["J", "Q", "J", "J"], ["J", "A", "K", "K"]]}
    cfg = config.load("tiny", data__test_hands="upstream", data__test_size=3)
    splits = data.build_splits(cfg)
    for rule in ("id", "ood"):
        assert [row["cards"] for row in splits[f"{rule}_test"]] == expected[rule]
    own = data.build_splits(config.load("tiny", data__test_size=3))
    assert [row["cards"] for row in own["id_test"]] != expected["id"]  # the default draws no suits
    assert config.load("qwen7b").data.test_hands == config.load("llama11b").data.test_hands == "upstream"
