//! The chat template: the model's Jinja template (`chat_template.jinja` or `tokenizer_config.json`'s
//! `chat_template`) rendered with minijinja the way Hugging Face transformers renders it (`trim_blocks`,
//! `lstrip_blocks`, Python string methods, `raise_exception`, Python-style `tojson`).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value, context};

use crate::errors::GatewayError;
use crate::tokenizer::{read_json_if_present, token_text};

const TEMPLATE_NAME: &str = "chat";

/// One message as the template sees it: content already a single string (text parts joined).
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    pub reasoning_content: Option<String>,
    /// As the client sent them (object key order kept).
    pub tool_calls: Option<Value>,
    pub name: Option<String>,
    pub tool_call_id: Option<String>,
}

impl TemplateMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
            reasoning_content: None,
            tool_calls: None,
            name: None,
            tool_call_id: None,
        }
    }

    fn to_value(&self) -> Value {
        // A map (templates look fields up by name; the order of a message's fields does not show).
        let mut fields: BTreeMap<&str, Value> = BTreeMap::from([
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ]);
        // Absent fields stay undefined: templates test `is defined`.
        if let Some(reasoning) = &self.reasoning_content {
            fields.insert("reasoning_content", Value::from(reasoning.as_str()));
        }
        if let Some(tool_calls) = &self.tool_calls {
            fields.insert("tool_calls", tool_calls.clone());
        }
        if let Some(name) = &self.name {
            fields.insert("name", Value::from(name.as_str()));
        }
        if let Some(id) = &self.tool_call_id {
            fields.insert("tool_call_id", Value::from(id.as_str()));
        }
        Value::from(fields)
    }
}

/// What the template needs besides the messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// Qwen3's switch; `true` is its default.
    pub enable_thinking: bool,
    pub tools: Option<Value>,
}

/// Why the template could not render these messages (its own `raise_exception`, or a template error).
#[derive(Debug, thiserror::Error)]
#[error("the chat template cannot render these messages: {0}")]
pub struct RenderError(String);

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Loads the template of the model folder `dir`: `chat_template.jinja` when present, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates: `default` is used).
    pub fn load(dir: &Path) -> Result<ChatTemplate, GatewayError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_present(&config_path)?;
        let special = |key: &str| {
            config
                .as_ref()
                .and_then(|config| config.get(key))
                .and_then(token_text)
        };
        let (bos_token, eos_token) = (special("bos_token"), special("eos_token"));
        let jinja_path = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => source,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                template_from_config(config.as_ref()).ok_or_else(|| GatewayError::ChatTemplate {
                    path: config_path.clone(),
                    reason: "no `chat_template` (and no chat_template.jinja beside it)".into(),
                })?
            }
            Err(error) => {
                return Err(GatewayError::TokenizerConfig {
                    path: jinja_path,
                    reason: error.to_string(),
                });
            }
        };
        ChatTemplate::from_source(&source, bos_token, eos_token).map_err(|error| {
            GatewayError::ChatTemplate {
                path: config_path,
                reason: error.to_string(),
            }
        })
    }

    /// Compiles a template source.
    pub fn from_source(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text for `messages`.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        options: &RenderOptions,
    ) -> Result<String, RenderError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| RenderError(error.to_string()))?;
        let messages: Vec<Value> = messages.iter().map(TemplateMessage::to_value).collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => options.add_generation_prompt,
                enable_thinking => options.enable_thinking,
                tools => options.tools.clone(),
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|error| RenderError(describe(&error)))
    }
}

fn template_from_config(config: Option<&serde_json::Value>) -> Option<String> {
    match config?.get("chat_template")? {
        serde_json::Value::String(source) => Some(source.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|name| name.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template"))
            .and_then(|template| template.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The error's own words (a `raise_exception` message is the whole point), without minijinja's debug dump.
fn describe(error: &Error) -> String {
    match error.detail() {
        Some(detail) if error.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        _ => error.to_string(),
    }
}

/// `raise_exception(message)`: what HF templates call to refuse a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False)` — `", "` and `": "` separators,
/// keys in their given order, non-ASCII kept; with `indent=N`, Python's indented layout.
fn python_tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let mut out = Vec::new();
    let result = match indent {
        Some(width) => {
            let spaces = vec![b' '; width];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
            serde::Serialize::serialize(value, &mut serializer)
        }
        None => {
            let mut serializer =
                serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter);
            serde::Serialize::serialize(value, &mut serializer)
        }
    };
    result.map_err(|error| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson failed: {error}"),
        )
    })?;
    String::from_utf8(out)
        .map(Value::from)
        .map_err(|error| Error::new(ErrorKind::InvalidOperation, error.to_string()))
}

/// Python's default `json.dumps` separators.
struct PythonJsonFormatter;

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}
