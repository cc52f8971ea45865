import pytest
import yaml

from engine.config import ConfigError, DistillConfig, config_hash, load_config
from engine.io.run_folder import save_config

DIGITS = "configs/digits.yaml"


def test_default_config_file_matches_dataclass_defaults():
    assert load_config(DIGITS) == DistillConfig()


def test_dotted_overrides_are_typed():
    config = load_config(DIGITS, ["quantize.ipc=10", "decode.strength=0.7", "evaluate.seeds=[3,4]"])
    assert config.quantize.ipc == (10,)
    assert config.decode.strength == 0.7
    assert config.evaluate.seeds == (3, 4)


def test_flags_may_come_before_between_or_after_the_overrides():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import distill

    config, options = distill.parse_args(["name=more", "--overwrite", "evaluate.seeds=[3,4]", "quantize.random_draws=5"])
    assert (config.name, config.evaluate.seeds, config.quantize.random_draws, options.overwrite) == \
        ("more", (3, 4), 5, True)


def test_int_is_accepted_for_float():
    assert load_config(None, ["decode.guidance_scale=3"]).decode.guidance_scale == 3.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("quantize.ipcs=10", "unknown key"),
        ("nonsense=1", "unknown key"),
        ("quantize.ipc=0", "quantize.ipc"),
        ("quantize.ipc=ten", "quantize.ipc"),
        ("evaluate.protocol=magic", "not one of"),
            ("evaluate.ddoq_weights=[cube]", "evaluate.ddoq_weights"),
        ("decode.strength=1.5", "decode.strength"),
        ("decode.strength_by_ipc={1: 1.5}", "decode.strength_by_ipc"),
        ("decode.strength_by_ipc={0: 0.5}", "decode.strength_by_ipc"),
        ("decode.strength_by_ipc=0.5", "expected a mapping"),
        ("evaluate.flip=maybe", "true/false"),
        ("prior.vae_steps=1.5", "expected int"),
        ("evaluate.methods=[random,oracle]", "evaluate.methods"),
        ("quantize=3", "expected a mapping"),
        ("no_equals_sign", "key.path=value"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])


def test_a_strength_per_ipc_reads_from_yaml_dotted_keys_and_json():
    """{ipc: strength} from an inline mapping, a dotted key per IPC, and a JSON round trip (string keys)."""
    from engine.config import config_to_dict

    config = load_config(DIGITS, ["decode.strength_by_ipc={1: 0.9}"])
    assert config.decode.strength_by_ipc == {1: 0.9}
    assert (config.decode.strength_at(1), config.decode.strength_at(10)) == (0.9, config.decode.strength)
    assert load_config(DIGITS, ["decode.strength_by_ipc.1=0.9"]) == config
    assert load_config(values=config_to_dict(config)) == config


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(DIGITS, ["quantize.ipc=[1,5]", "name=x", "decode.strength_by_ipc={1: 0.8}"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["quantize"]["ipc"] == [1, 5]


def test_config_hash_tracks_content():
    a, b = DistillConfig(), load_config(None, ["decode.strength=0.9"])
    assert config_hash(a.quantize) == config_hash(b.quantize)
    assert config_hash(a.decode) != config_hash(b.decode)


def test_run_dir_is_absolute():
    assert DistillConfig().run_dir.is_absolute()
