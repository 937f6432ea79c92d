"""Sampler constructors: the shape arguments are positional, every option after them is
keyword-only (a value given by position must not silently become, e.g., LLaDA's temperature)."""

import inspect

import pytest

from dlmfuse import samplers
from dlmfuse.samplers.llada import LLADA_MASK_TOKEN_ID

POSITIONAL = {
    samplers.LLaDA: ("steps", "gen_length", "block_length"),
    samplers.FastDLLM: ("gen_length", "block_length"),
    samplers.Dream: ("steps", "gen_length"),
    samplers.MDLM: ("steps", "gen_length"),
    samplers.EsoLM: ("steps", "gen_length"),
    samplers.ReMDM: ("steps", "gen_length"),
}


@pytest.mark.parametrize("sampler", list(POSITIONAL), ids=lambda cls: cls.__name__)
def test_options_after_the_shape_are_keyword_only(sampler):
    params = list(inspect.signature(sampler).parameters.values())
    leading = POSITIONAL[sampler]
    assert tuple(p.name for p in params[:len(leading)]) == leading
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:len(leading)])
    options = params[len(leading):]
    assert options, f"{sampler.__name__} has no options"
    assert [p.name for p in options if p.kind is not p.KEYWORD_ONLY] == []


def test_llada_pinned_signature():
    """The contract's LLaDA(steps, gen_length, block_length, temperature=0.0,
    remasking="low_confidence", cfg_scale=0.0, mask_token_id=...), options by keyword."""
    params = inspect.signature(samplers.LLaDA).parameters
    defaults = {name: params[name].default for name in ("temperature", "remasking", "cfg_scale", "mask_token_id")}
    assert defaults == dict(temperature=0.0, remasking="low_confidence", cfg_scale=0.0,
                            mask_token_id=LLADA_MASK_TOKEN_ID)


@pytest.mark.parametrize("make", [
    lambda: samplers.LLaDA(32, 32, 8, 999),                   # 999 meant as the mask id
    lambda: samplers.LLaDA(32, 32, 8, 0.0, "random"),
    lambda: samplers.FastDLLM(32, 8, 0.9),
    lambda: samplers.Dream(32, 32, 999),
    lambda: samplers.MDLM(32, 32, 999),
    lambda: samplers.EsoLM(32, 32, 999),
    lambda: samplers.ReMDM(32, 32, 999),
], ids=["llada-mask-id", "llada-options", "fastdllm", "dream", "mdlm", "esolm", "remdm"])
def test_an_option_given_by_position_raises_type_error(make):
    with pytest.raises(TypeError, match="positional argument"):
        make()


def test_keywords_still_work():
    s = samplers.LLaDA(32, 32, 8, temperature=0.5, remasking="random", cfg_scale=1.0, mask_token_id=999)
    assert (s.temperature, s.remasking, s.cfg_scale, s.mask_token_id) == (0.5, "random", 1.0, 999)
    f = samplers.FastDLLM(32, 8, threshold=0.9, temperature=0.5, mask_token_id=999)
    assert (f.threshold, f.temperature, f.mask_token_id, f.steps) == (0.9, 0.5, 999, 32)
