//! `GET /openapi.json` against the router it describes: every documented operation is served and answers with a
//! documented status, content type and required fields; every served path is documented. (schemathesis, run by
//! `scripts/schemathesis.sh`, then checks whole responses against the schemas with generated inputs.)

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use support::{CONTEXT_LENGTH_TOKENS, MODEL, TestGateway};
use tower::ServiceExt;

async fn document(gateway: &TestGateway) -> Value {
    let (status, body) = gateway.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).expect("the OpenAPI document is JSON")
}

/// Resolves a local `$ref` (`#/components/...`).
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            document
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} is not in the document"))
        }
        None => schema,
    }
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let gateway = TestGateway::start().await;
    let document = document(&gateway).await;
    assert_eq!(document["openapi"], "3.1.0");
    // What depends on the served model is filled in.
    let chat_request = &document["components"]["schemas"]["ChatCompletionRequest"]["properties"];
    assert_eq!(chat_request["model"]["enum"], json!([MODEL, null]));
    assert_eq!(
        chat_request["max_tokens"]["maximum"],
        json!(CONTEXT_LENGTH_TOKENS - 1)
    );
    assert_eq!(
        chat_request["messages"]["maxItems"],
        json!(CONTEXT_LENGTH_TOKENS)
    );
    // Ids must be embedding rows (151,936) and known to the tokenizer (151,669 ids): the smaller bound.
    assert_eq!(
        chat_request["stop_token_ids"]["items"]["maximum"],
        json!(151_668)
    );
    let paths = document["paths"].as_object().expect("paths");
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4}),
        ),
    ];
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().expect("operations") {
            let request = match method.as_str() {
                "get" => Request::get(path.as_str()).body(Body::empty()),
                "post" => {
                    let body = &bodies
                        .iter()
                        .find(|(with_body, _)| with_body == path)
                        .unwrap_or_else(|| panic!("no test body for POST {path}"))
                        .1;
                    Request::post(path.as_str())
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(body.to_string()))
                }
                other => panic!("{other} {path}: a method the test does not know"),
            }
            .expect("request");
            let response = gateway
                .router
                .clone()
                .oneshot(request)
                .await
                .expect("router answers");
            let status = response.status();
            let documented = &operation["responses"][status.as_str()];
            assert!(
                documented.is_object(),
                "{method} {path} answered {status}, which is not documented"
            );
            let documented = resolve(&document, documented);
            let content_type = response.headers()[header::CONTENT_TYPE]
                .to_str()
                .expect("ASCII content type")
                .split(';')
                .next()
                .expect("a media type")
                .trim()
                .to_string();
            let media = &documented["content"][&content_type];
            assert!(
                media.is_object(),
                "{method} {path} answered {content_type}, which is not documented for {status}"
            );
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            if content_type == "application/json" {
                let body: Value = serde_json::from_slice(&body).expect("JSON body");
                let schema = resolve(&document, &media["schema"]);
                for required in schema["required"].as_array().into_iter().flatten() {
                    let field = required.as_str().expect("field name");
                    assert!(
                        body.get(field).is_some(),
                        "{method} {path}: `{field}` is required by the document but missing: {body}"
                    );
                }
            }
        }
    }
    // Every route the router serves is documented (besides the document itself).
    for served in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(paths.contains_key(served), "{served} is not documented");
    }
}
