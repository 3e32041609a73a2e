"""The price table: lookup of model ids, override files and flags, and cost arithmetic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmbatch._exceptions import ConfigError, InputError
from llmbatch.pricing import ModelPrice, PriceTable, Tariff, cost, normalize_model

REQUIRED_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3",
    "o4-mini",
    "o3-mini",
    "o1",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "gpt-3.5-turbo",
    "echo",
]


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# -- the bundled table -----------------------------------------------------------------------


def test_bundled_table_is_dated_and_covers_the_main_models(table: PriceTable) -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", table.taken)
    assert table.source
    for model in REQUIRED_MODELS:
        assert model in table.models, model


def test_bundled_batch_prices_are_half_of_direct(table: PriceTable) -> None:
    """Every provider's batch discount is 50%, except on Together, where unlisted models get none."""
    tiers = [(f"{m} above 200k", p.above_200k) for m, p in table.models.items() if p.above_200k is not None]
    assert tiers  # the long-prompt rates are checked the same way
    for model, price in [*table.models.items(), *tiers]:
        assert price is not None
        if price.provider == "together" and price.batch_input == price.input:
            assert price.batch_output == price.output, model
            continue
        assert price.batch_input == pytest.approx(price.input / 2), model
        assert price.batch_output == pytest.approx(price.output / 2), model
        if price.batch_cached_input is not None:
            assert price.cached_input is not None
            assert price.batch_cached_input == pytest.approx(price.cached_input / 2), model


def test_known_prices(table: PriceTable) -> None:
    gpt4o = table.lookup("gpt-4o")
    assert gpt4o is not None
    assert (gpt4o.input, gpt4o.cached_input, gpt4o.output) == (2.50, 1.25, 10.00)
    mini = table.lookup("gpt-4o-mini")
    assert mini is not None and (mini.input, mini.output, mini.batch_input, mini.batch_output) == (
        0.15,
        0.60,
        0.075,
        0.30,
    )
    emb = table.lookup("text-embedding-3-small")
    assert emb is not None and emb.output == 0 and emb.input == 0.02
    echo = table.lookup("echo")
    assert echo is not None and cost(echo, 10**9, 10**9) == 0 and cost(echo, 10**9, 10**9, batch=False) == 0


def test_bundled_file_is_package_data_next_to_the_module() -> None:
    import llmbatch.pricing as pricing

    doc = json.loads((Path(pricing.__file__).parent / "prices.json").read_text(encoding="utf-8"))
    assert set(doc) >= {"taken", "source", "models"}
    assert all(entry["provider"] for entry in doc["models"].values())


# -- lookup ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # longest prefix, not gpt-4o
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # a snapshot priced apart has its own entry
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-2025-04-16", "o3"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("openai/gpt-4o", "gpt-4o"),
        ("openai/gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("GPT-4o-Mini", "gpt-4o-mini"),
        ("  gpt-4o ", "gpt-4o"),
        ("omni-moderation-latest", "omni-moderation"),
    ],
)
def test_lookup_resolves_snapshots_and_prefixes(table: PriceTable, model: str, key: str) -> None:
    assert table.resolve(model) == key
    assert table.lookup(model) is table.models[key]


@pytest.mark.parametrize(
    "model",
    [
        "unknown-model",
        "gpt-4o2",  # not on a dash boundary
        "gpt",
        "",
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",  # fine-tunes cost more than their base
        "meta-llama/Llama-3.1-8B-Instruct",
    ],
)
def test_lookup_unknown(table: PriceTable, model: str) -> None:
    assert table.lookup(model) is None


def test_normalize_model() -> None:
    assert normalize_model("OpenAI/GPT-4o") == "gpt-4o"
    assert normalize_model("a/b/c") == "c"
    assert normalize_model("gpt-4o") == "gpt-4o"


# -- override files --------------------------------------------------------------------------


def test_override_simple_shape_adds_and_replaces(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "prices.json",
        {"my-model": {"input": 1.0, "output": 2.0}, "gpt-4o": {"input": 3.0, "output": 12.0, "batch_input": 1.5}},
    )
    table = PriceTable.load(path)
    mine = table.lookup("my-model-2025-01-01")
    assert mine is not None and (mine.input, mine.output) == (1.0, 2.0)
    gpt4o = table.lookup("gpt-4o-2024-08-06")
    assert gpt4o is not None and (gpt4o.input, gpt4o.output, gpt4o.batch_input) == (3.0, 12.0, 1.5)
    # The override entry replaces the bundled one whole: no bundled batch_output leaks in,
    # so batch output falls back to the direct price.
    assert gpt4o.batch_output is None
    assert gpt4o.rates(batch=True) == (1.5, 1.5, 12.0)
    # Everything else is still bundled.
    assert table.lookup("gpt-4o-mini") == PriceTable.load().lookup("gpt-4o-mini")
    assert table.taken == PriceTable.load().taken
    assert str(path) in table.source


def test_override_full_shape_and_provider_prefixed_keys(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "p.json",
        {
            "taken": "2030-01-01",
            "source": "mine",
            "models": {"openai/gpt-4o-mini": {"provider": "openai", "input": 0.1, "output": 0.4}},
        },
    )
    table = PriceTable.load(path)
    price = table.lookup("gpt-4o-mini")
    assert price is not None and price.input == 0.1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"m": 3}', "entry for 'm' must be an object"),
        ('{"m": {"input": 1}}', "output"),
        ('{"m": {"input": -1, "output": 1}}', "input"),
        ('{"m": {"input": "cheap", "output": 1}}', "input"),
        ('{"m": {"input": 1, "output": 1, "batch_inptu": 0.5}}', "batch_inptu"),
    ],
)
def test_malformed_override_names_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad-prices.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as info:
        PriceTable.load(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message


def test_missing_override_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(InputError, match="does not exist") as info:
        PriceTable.load(path)
    assert str(path) in str(info.value)


# -- flags -----------------------------------------------------------------------------------


def test_with_override_new_model_needs_input_and_output(table: PriceTable) -> None:
    with pytest.raises(ConfigError, match="--price-input"):
        table.with_override("my-model", output=2.0)
    new = table.with_override("my-model", input=1.0, output=2.0)
    price = new.lookup("my-model")
    assert price is not None
    assert price.rates(batch=False) == (1.0, 1.0, 2.0)
    assert price.rates(batch=True) == (1.0, 1.0, 2.0)  # no batch discount unless stated
    assert table.lookup("my-model") is None  # the original is unchanged


def test_with_override_changes_only_what_is_given(table: PriceTable) -> None:
    new = table.with_override("gpt-4o", output=20.0)
    price = new.lookup("gpt-4o-2024-08-06")
    assert price is not None
    assert (price.input, price.cached_input, price.batch_input) == (2.5, 1.25, 1.25)
    # A changed direct price drops the batch price derived from the old one.
    assert price.output == 20.0 and price.batch_output is None
    assert price.rates(batch=True)[2] == 20.0

    new = table.with_override("gpt-4o", input=4.0, batch_input=2.0)
    price = new.lookup("gpt-4o")
    assert price is not None
    assert price.rates(batch=False) == (4.0, 4.0, 10.0)
    assert price.rates(batch=True) == (2.0, 2.0, 5.0)


def test_with_override_snapshot_key_leaves_base_alone(table: PriceTable) -> None:
    new = table.with_override("gpt-4o-2024-08-06", input=9.0)
    assert new.lookup("gpt-4o-2024-08-06").input == 9.0  # type: ignore[union-attr]
    assert new.lookup("gpt-4o").input == 2.5  # type: ignore[union-attr]


def test_with_override_rejects_bad_values(table: PriceTable) -> None:
    with pytest.raises(ConfigError, match="gpt-4o"):
        table.with_override("gpt-4o", input=-1.0)
    with pytest.raises(ConfigError, match="No price given"):
        table.with_override("gpt-4o")


# -- cost ------------------------------------------------------------------------------------


def test_cost_batch_and_direct() -> None:
    price = ModelPrice(input=2.0, cached_input=0.5, output=8.0, batch_input=1.0, batch_output=4.0)
    assert cost(price, 1_000_000, 1_000_000, batch=False) == pytest.approx(10.0)
    assert cost(price, 1_000_000, 1_000_000) == pytest.approx(5.0)
    assert cost(price, 1000, 500, batch=False) == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6)


def test_cost_cached_tokens_are_part_of_input() -> None:
    price = ModelPrice(
        input=2.0, cached_input=0.5, output=8.0, batch_input=1.0, batch_cached_input=0.25, batch_output=4.0
    )
    # 1M input of which 400k cached: 600k at the full rate, 400k at the cached rate.
    assert cost(price, 1_000_000, 0, 400_000, batch=False) == pytest.approx(0.6 * 2.0 + 0.4 * 0.5)
    assert cost(price, 1_000_000, 0, 400_000, batch=True) == pytest.approx(0.6 * 1.0 + 0.4 * 0.25)
    # More cached than input is clamped, never negative.
    assert cost(price, 100, 0, 1_000, batch=False) == pytest.approx(100 * 0.5 / 1e6)


def test_cost_fallbacks() -> None:
    price = ModelPrice(input=2.0, output=8.0, batch_input=1.0, batch_output=4.0)
    # No cached rates: cached input costs the same as uncached input (direct and batch).
    assert cost(price, 1_000_000, 0, 1_000_000, batch=False) == pytest.approx(2.0)
    assert cost(price, 1_000_000, 0, 1_000_000, batch=True) == pytest.approx(1.0)
    price = ModelPrice(input=2.0, cached_input=0.5, output=8.0)
    assert price.rates(batch=True) == (2.0, 2.0, 8.0)
    assert price.rates(batch=False) == (2.0, 0.5, 8.0)


def test_cost_real_model(table: PriceTable) -> None:
    price = table.lookup("gpt-5-mini-2025-08-07")
    assert price is not None
    direct = cost(price, 2_000_000, 500_000, 1_000_000, batch=False)
    assert direct == pytest.approx(1.0 * 0.25 + 1.0 * 0.025 + 0.5 * 2.0)
    batch = cost(price, 2_000_000, 500_000, 1_000_000)
    assert batch == pytest.approx(direct / 2)


def test_provider_scoped_prices() -> None:
    """MODEL@PROVIDER entries price a model on that provider only, and win over a plain entry there."""
    from llmbatch.pricing import PriceTable

    table = PriceTable.load()
    assert table.for_provider("groq").lookup("openai/gpt-oss-120b") is not None
    assert table.for_provider("mistral").lookup("gpt-oss-120b") is None  # Groq's price does not leak
    assert table.for_provider(None).lookup("gpt-oss-120b") is None
    assert table.for_provider("anthropic").lookup("claude-sonnet-4-5-20250929").batch_input == 1.5  # type: ignore[union-attr]
    assert all("@" not in k for k in table.for_provider("groq").models)


def test_gemini_on_vertex_has_its_own_prices() -> None:
    """Vertex prices Gemini models itself (2.0 Flash costs more there than on the Gemini API); its
    batch jobs cost half, the long-prompt tier included."""
    from llmbatch.pricing import PriceTable

    table = PriceTable.load()
    vertex, gemini = table.for_provider("vertex"), table.for_provider("gemini")
    flash = vertex.lookup("gemini-2.0-flash-001")
    assert flash is not None and (flash.input, flash.output, flash.batch_input, flash.batch_output) == (
        0.15,
        0.6,
        0.075,
        0.3,
    )
    assert gemini.lookup("gemini-2.0-flash").input == 0.1  # type: ignore[union-attr]
    pro = vertex.lookup("gemini-2.5-pro")
    assert pro is not None and pro.provider == "vertex" and pro.tier(300_000).batch_output == 7.5
    assert vertex.lookup("gemini-2.5-flash-lite").batch_input == 0.05  # type: ignore[union-attr]


def test_mistral_and_together_batch_discounts_follow_their_docs() -> None:
    """Mistral batches cost half of direct for every model; Together's only for the models it lists."""
    from llmbatch.pricing import PriceTable

    table = PriceTable.load()
    mistral = table.for_provider("mistral")
    large = mistral.lookup("mistral/mistral-large-2512")
    assert large is not None and (large.batch_input, large.batch_output) == (large.input / 2, large.output / 2)
    assert mistral.lookup("mistral-large-latest") is None  # the sources disagree on where the alias points
    together = table.for_provider("together")
    mixtral = together.lookup("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert mixtral is not None and mixtral.batch_input == mixtral.input / 2
    oss = together.lookup("openai/gpt-oss-120b")
    assert oss is not None and (oss.batch_input, oss.batch_output) == (oss.input, oss.output)  # not discounted
    assert oss != table.for_provider("groq").lookup("openai/gpt-oss-120b")
    assert table.for_provider("openai").lookup("mistral-large-2512") is None  # Mistral's prices stay on Mistral


def test_priced_as_gives_other_names_a_model_s_prices() -> None:
    import pytest

    from llmbatch._exceptions import ConfigError
    from llmbatch.pricing import PriceTable

    table = PriceTable.load()
    mini = table.lookup("gpt-4o-mini")
    priced = table.priced_as(["my-deployment"], "gpt-4o-mini").lookup("my-deployment")
    assert mini is not None and priced is not None
    assert priced.rates(batch=True) == mini.rates(batch=True) and priced.rates(batch=False) == mini.rates(batch=False)
    with pytest.raises(ConfigError, match="no-such-model"):
        table.priced_as(["x"], "no-such-model")


def test_long_prompts_pay_the_long_prompt_rates(table: PriceTable) -> None:
    """Above 200,000 prompt tokens the whole request is billed at the higher tier; at or under, the base."""
    pro = table.lookup("gemini-2.5-pro-preview-06-05")
    assert pro is not None and pro.above_200k is not None
    assert cost(pro, 200_000, 1_000, batch=False) == pytest.approx((200_000 * 1.25 + 1_000 * 10.0) / 1e6)
    assert cost(pro, 200_001, 1_000, batch=False) == pytest.approx((200_001 * 2.5 + 1_000 * 15.0) / 1e6)
    assert cost(pro, 200_001, 1_000) == pytest.approx(cost(pro, 200_001, 1_000, batch=False) / 2)
    tariff = Tariff(pro, batch=True)
    assert tariff(300_000, 10, 100_000) == pytest.approx(cost(pro, 300_000, 10, 100_000))
    assert tariff(1_000, 10) == pytest.approx(cost(pro, 1_000, 10))
    assert Tariff(None, batch=True)(300_000, 10) == Tariff(None, batch=False)(1, 1) == 0.0
    flat = table.lookup("gpt-4.1")
    assert flat is not None and flat.above_200k is None
    assert cost(flat, 300_000, 0) == pytest.approx(300_000 * flat.rates(batch=True)[0] / 1e6)


def test_long_prompt_rates_in_price_files_flags_and_price_as(tmp_path: Path, table: PriceTable) -> None:
    path = tmp_path / "prices.json"
    long = {"input": 4, "output": 8}
    path.write_text(json.dumps({"my-model": {"input": 1, "output": 2, "above_200k": long}}))
    mine = PriceTable.load(path).lookup("my-model")
    assert mine is not None and mine.above_200k == ModelPrice(**long)
    assert cost(mine, 250_000, 0, batch=False) == pytest.approx(1.0)
    path.write_text(json.dumps({"my-model": {"input": 1, "output": 2, "above_200k": {**long, "above_200k": long}}}))
    with pytest.raises(InputError, match="above_200k"):
        PriceTable.load(path)
    # Flags cannot state long-prompt rates: a new input or output price drops them.
    changed = table.with_override("gemini-2.5-pro", input=2.0).lookup("gemini-2.5-pro")
    assert changed is not None and changed.above_200k is None
    kept = table.with_override("gemini-2.5-pro", batch_input=0.5).lookup("gemini-2.5-pro")
    assert kept is not None and kept.above_200k is not None
    # A deployment priced as a model pays that model's long-prompt rates too.
    as_pro = table.priced_as(["my-deployment"], "gemini-2.5-pro").lookup("my-deployment")
    assert as_pro is not None and as_pro.above_200k == table.lookup("gemini-2.5-pro").above_200k  # type: ignore[union-attr]
