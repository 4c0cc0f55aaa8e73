"""Fuzz target: the configuration loader. Any text gives a Config or a ConfigError that
names the file; nothing else escapes."""

import sys

import atheris

with atheris.instrument_imports():
    from portcullis import config


def test_one_input(data: bytes) -> None:
    try:
        config.loads(data, "fuzz.yaml")
    except config.ConfigError as error:
        assert str(error).startswith("fuzz.yaml"), str(error)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
