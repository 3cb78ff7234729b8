"""ModelBatchSearcher without a running sweep: argument errors, import-light relay, state save/restore."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ray")
from ray import cloudpickle, tune
from ray.tune.execution.tune_controller import _get_max_pending_trials
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from tune_recipes import recipe

from tune_integration import ModelBatchSearcher
from tune_integration._lookahead import GroupingLookahead
from tune_integration._sampler import SpaceSampler

SPACE = {"lr": tune.loguniform(1e-3, 1e-1), "hidden": tune.grid_search([8, 16]), "seed": tune.randint(0, 99)}


def test_relay_side_modules_import_without_torch():
    code = (
        "import sys, tune_integration, tune_integration._relay, tune_integration._server, "
        "tune_integration._service, tune_integration._policy; "
        "print(sorted(m for m in ('torch', 'modelbatch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_inner_searcher_is_the_one_passed_in_and_tune_walks_a_concurrency_limiter_chain_to_it():
    inner = SpaceSampler()
    searcher = ModelBatchSearcher(recipe(), searcher=inner, slots_per_gpu=4)
    assert searcher.inner_searcher is inner
    assert ModelBatchSearcher(recipe(), slots_per_gpu=4).inner_searcher is None  # none passed: sampled
    # Tune's own walk down .searcher: a ConcurrencyLimiter at the slots, the grouping lookahead, the inner one
    searcher._limiter.set_max_concurrency(4)
    assert _get_max_pending_trials(SearchGenerator(searcher)) == 4  # else Tune starts members one by one
    assert isinstance(searcher.searcher, ConcurrencyLimiter)
    lookahead = searcher.searcher.searcher
    assert isinstance(lookahead, GroupingLookahead) and lookahead.searcher is inner


def test_n_slots_and_its_deprecated_name_capacity():
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=4)
    assert searcher.n_slots is None  # no sweep open yet
    with pytest.warns(
        FutureWarning, match=r"^ModelBatchSearcher: capacity is deprecated, use n_slots \(same"
    ):
        assert searcher.capacity is None


def _one_member_in_flight() -> tuple[ModelBatchSearcher, dict]:
    """What tune.run does, minus starting the servers: t0 completed, t1 suggested (its config)."""
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=2, random_state=0)
    searcher._ahead.set_search_properties("val_loss", "min", SPACE)
    searcher._limiter.set_max_concurrency(2)
    config = searcher._limiter.suggest("t1")
    searcher._completed.add("t0")
    return searcher, config


def test_tunes_experiment_checkpoint_saves_and_restores_each_wrapper_of_the_searcher(tmp_path):
    """Tune saves a searcher chain wrapper by wrapper along ``.searcher`` (SearchGenerator.save_to_dir)."""
    searcher, config = _one_member_in_flight()
    SearchGenerator(searcher).save_to_dir(str(tmp_path), "session")

    restored = ModelBatchSearcher(recipe(), slots_per_gpu=2)
    SearchGenerator(restored).restore_from_dir(str(tmp_path))
    assert restored.get_state()["completed"] == ["t0"] and restored._limiter.live_trials == {"t1"}
    assert (
        restored._inner.suggested == 1
        and restored._ahead.live_keys.keys() == searcher._ahead.live_keys.keys()
    )
    assert config["hidden"] == 8


def test_architecture_keys_group_configs_by_pack_without_building_real_weights():
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=4)
    key = searcher._architecture_key
    assert key({"lr": 0.1, "hidden": 8}) == key({"lr": 0.01, "hidden": 8, "seed": 3}) is not None
    assert key({"hidden": 8}) != key({"hidden": 16})
    assert key({"hidden": 8, "seed": "x"}) is None  # a bad config: its member reports why


def test_space_sampler_cycles_the_grid_and_restores(tmp_path):
    sampler = SpaceSampler(random_state=0)
    sampler.set_search_properties("val_loss", "min", SPACE)
    first = [sampler.suggest(str(i)) for i in range(3)]
    assert [c["hidden"] for c in first] == [8, 16, 8]
    assert len(sampler.samples(4)) == 4 and [c["hidden"] for c in sampler.samples(2)] == [8, 16]
    sampler.save(str(tmp_path / "s.pkl"))
    restored = SpaceSampler()
    restored.restore(str(tmp_path / "s.pkl"))
    assert restored.suggested == 3 and restored.metric == "val_loss"
    more = [restored.suggest("a"), restored.suggest("b")]  # a restored sampler starts a new grid pass
    assert [c["hidden"] for c in more] == [8, 16] and all(1e-3 <= c["lr"] <= 1e-1 for c in more)


def test_space_sampler_refuses_the_state_of_another_searcher(tmp_path):
    """Resuming an Optuna sweep with the default sampler: a clear error, not ``KeyError: 'space'``."""
    from ray.tune.search.optuna import OptunaSearch

    optuna = OptunaSearch(space={"lr": tune.loguniform(1e-3, 1e-1)}, metric="val_loss", mode="min", seed=0)
    optuna.suggest("a")
    optuna.save(str(tmp_path / "optuna.pkl"))
    with pytest.raises(ValueError, match="ModelBatchSearcher: the saved searcher state is not a random/grid"):
        SpaceSampler().restore(str(tmp_path / "optuna.pkl"))


def test_searcher_state_saves_restores_and_pickles(tmp_path):
    searcher, config = _one_member_in_flight()
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = ModelBatchSearcher(recipe(), slots_per_gpu=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.get_state()["completed"] == ["t0"]
    assert restored._limiter.live_trials == {"t1"} and restored._inner.suggested == 1
    assert config["hidden"] == 8 and restored._inner.suggest("t2")["hidden"] in (8, 16)
    clone = cloudpickle.loads(cloudpickle.dumps(restored))  # Tuner pickles its search_alg
    assert clone._sweep is None and clone.get_state() == restored.get_state()


def test_configs_drawn_ahead_and_their_inner_ids_survive_save_and_restore(tmp_path):
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=2, random_state=0)
    searcher._ahead.set_search_properties("val_loss", "min", SPACE, num_samples=8)
    searcher._limiter.set_max_concurrency(2)
    searcher._ahead.ahead = 2  # set when the servers start
    given = [searcher._limiter.suggest(t)["hidden"] for t in ("t1", "t2")]
    assert given == [8, 8]  # the grid alternates 8, 16: the second went to the live member's architecture
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = ModelBatchSearcher(recipe(), slots_per_gpu=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [e["config"]["hidden"] for e in restored._ahead.waiting] == [16, 16]
    assert restored._ahead.inner_ids == searcher._ahead.inner_ids and restored._inner.suggested == 4


def test_architecture_keys_of_configs_with_tune_placeholders_use_the_resolved_objects():
    from ray.tune.impl.placeholder import create_resolvers_map, inject_placeholders
    from ray.tune.search.variant_generator import generate_variants
    from torch import nn

    space = {"act": tune.grid_search([nn.Tanh, nn.ReLU]), "hidden": tune.sample_from(lambda: 8)}
    resolvers = create_resolvers_map()
    injected = inject_placeholders(space, resolvers)  # what tune.run hands a searcher
    tanh, relu = (config for _, config in generate_variants(injected))
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=4)
    key = searcher._architecture_key
    assert key(tanh) is None  # placeholders, and no tune.run to resolve them
    searcher._resolvers = resolvers
    assert key(tanh) is None  # hidden is drawn in the trial: its architecture is unknown here
    tanh, relu = ({**c, "hidden": 8} for c in (tanh, relu))
    assert key(tanh) == key({"act": nn.Tanh, "hidden": 8}) != key(relu) == key({"act": nn.ReLU, "hidden": 8})


def test_a_members_model_is_built_once_for_its_pack_key_and_once_for_its_weights():
    """From the searcher's suggestion to its slot: the key is built on the meta device once and sent
    with the config; the packs find the member's pack by it (before: a meta build per pack with room
    as well, 38 builds here instead of 27)."""
    from tune_recipes import make_model

    from tune_integration._packs import Packs
    from tune_integration._relay import PACK_KEY

    builds: dict[float, int] = {}

    def counting(cfg: dict):
        builds[cfg["lr"]] = builds.get(cfg["lr"], 0) + 1
        return make_model(cfg)

    rec = recipe(model=counting)
    searcher = ModelBatchSearcher(rec, slots_per_gpu=4, random_state=0)
    space = {"lr": tune.loguniform(1e-3, 1e-1), "hidden": tune.grid_search([8, 16, 32])}
    searcher._ahead.set_search_properties("val_loss", "min", space, num_samples=12)
    searcher._limiter.set_max_concurrency(12)
    searcher._ahead.ahead = 4  # set when the servers start
    packs = Packs(rec, 4)
    firsts = []
    for i in range(12):
        config = dict(searcher._next_config(f"t{i}"))
        key = config.pop(PACK_KEY)  # what the relay does before it joins
        assert builds[config["lr"]] == 1 and key == searcher._ahead.live_keys[f"t{i}"]
        known = set(packs.packs)
        pid = packs.join(f"t{i}", config, None, key=key)
        firsts += [config["lr"]] if pid not in known else []
        assert packs.packs[pid].slots[packs.packs[pid].slot_of(f"t{i}")].config == config
    assert len(packs.packs) == 3 and len(builds) == 12
    # the key, the member's weights, and the pack's template for the first member of each pack
    assert {lr: n - (lr in firsts) for lr, n in builds.items()} == dict.fromkeys(builds, 2)
    assert sum(builds.values()) == 27


def test_a_pack_factorys_own_trainer_with_the_deprecated_names_still_works_with_a_warning():
    from tune_integration._packs import member_state_dict, n_slots

    class OldTrainer:  # a trainer written against the slot API before the renames
        capacity = 3

        def member_state(self, member, on_device=False):
            return {"member": member, "on_device": on_device}

    old = r"^ModelBatchSearcher: the pack factory's trainer has {} but no {}; .* rename it"
    with pytest.warns(FutureWarning, match=old.format(r"member_state\(\)", r"member_state_dict\(\)")):
        assert member_state_dict(OldTrainer(), "m", on_device=True) == {"member": "m", "on_device": True}
    with pytest.warns(FutureWarning, match=old.format("capacity", "n_slots")):
        assert n_slots(OldTrainer()) == 3
