"""Request parsing without a server: the sampling fields' ranges (each refusal names its field)."""
import pytest

from rayprism.server.protocol import APIError, parse_request


def parse(**fields):
    return parse_request({"model": "tiny", "prompt": "hi", **fields}, chat=False).params


@pytest.mark.parametrize("field, value", [("repetition_penalty", 0.01), ("repetition_penalty", 5),
                                          ("presence_penalty", -2), ("presence_penalty", 1.5),
                                          ("frequency_penalty", 2), ("frequency_penalty", -0.5),
                                          ("min_p", 0), ("min_p", 1), ("min_tokens", 0), ("min_tokens", 16),
                                          ("logit_bias", {})])
def test_logits_processor_fields_in_range(field, value):
    assert getattr(parse(**{field: value}), field) == value


@pytest.mark.parametrize("field, value", [("repetition_penalty", 0), ("repetition_penalty", -1),
                                          ("repetition_penalty", True), ("presence_penalty", 2.01),
                                          ("presence_penalty", "1"), ("frequency_penalty", -2.5),
                                          ("min_p", -0.1), ("min_p", 1.01), ("min_tokens", -1),
                                          ("min_tokens", 17), ("min_tokens", 1.0), ("logit_bias", []),
                                          ("logit_bias", {"5": 100.5}), ("logit_bias", {"-1": 1}),
                                          ("logit_bias", {"x": 1}), ("logit_bias", {"5": "1"}),
                                          ("logit_bias", {str(i): 1 for i in range(301)})])
def test_logits_processor_fields_out_of_range(field, value):
    with pytest.raises(APIError) as error:
        parse(**{field: value})
    assert (error.value.status, error.value.param) == (400, field)


def test_logit_bias_keys_become_token_ids():
    assert parse(logit_bias={"5": 100, "49151": -2.5}).logit_bias == {5: 100, 49151: -2.5}


def test_chat_min_tokens_waits_for_the_default_max_tokens():
    """Chat's max_tokens defaults to what the context leaves once the prompt is known: not refused before."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 40}
    assert parse_request(body, chat=True).params.min_tokens == 40


def test_response_format_text_is_accepted():
    parse_request({"model": "tiny", "prompt": "hi", "response_format": {"type": "text"}}, chat=False)


@pytest.mark.parametrize("value", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}, "text"])
def test_structured_output_is_refused(value):
    with pytest.raises(APIError) as error:
        parse(response_format=value)
    assert (error.value.status, error.value.param) == (400, "response_format")
    assert value == "text" or "structured output is not supported yet" in error.value.message


def chat(**fields):
    return parse_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}, chat=True)


def test_chat_template_options():
    assert chat().template_options == {"add_generation_prompt": True, "continue_final_message": False}
    options = chat(add_generation_prompt=False, continue_final_message=True, chat_template_kwargs={"x": [1]})
    assert options.template_options == {"x": [1], "add_generation_prompt": False, "continue_final_message": True}


@pytest.mark.parametrize("field, value", [("add_generation_prompt", 1), ("continue_final_message", "yes"),
                                          ("continue_final_message", True), ("chat_template_kwargs", [1]),
                                          ("chat_template_kwargs", {"tokenize": True}),
                                          ("chat_template_kwargs", {"add_generation_prompt": False}),
                                          ("chat_template_kwargs", {"x": "y" * 16384})])
def test_chat_template_options_refused(field, value):
    with pytest.raises(APIError) as error:
        chat(**{field: value})
    assert (error.value.status, error.value.param) == (400, field)
