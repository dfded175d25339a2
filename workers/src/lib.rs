//! Workers: the Qwen3 engine (model loading, backends, paged KV cache, sampling) and, later, the prefill and
//! decode roles and the KV transfer service.
