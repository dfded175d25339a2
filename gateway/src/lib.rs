//! The gateway: OpenAI HTTP API, chat template, tokenizer, incremental detokenization, SSE.
//!
//! Not built yet: filed as its own issue ("Gateway and `tandem serve`").
//! The crate exists so the workspace has the shape of DESIGN.md §2 from the start.
