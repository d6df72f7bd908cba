"""
Hypothesis strategies for JSON values as a client may send them: text with
lone surrogates (legal in JSON as \\u escapes), integers beyond 64 bits,
any finite float, nested arrays and objects.  Shared by the codec, the
JSON-RPC and the hostile-client property tests.
"""

from __future__ import annotations

from hypothesis import strategies as st

#: text with lone surrogates, often, and the characters that trip codecs;
#: built from characters because st.text() never yields surrogates
any_text = st.lists(
    st.characters()
    | st.characters(categories=["Cs"])
    | st.sampled_from("\ud800\udfff\x00\u2028\"\\\ufeff😀"),
    max_size=20,
).map("".join)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
