//! The tokenizer of a model directory (`tokenizer.json` through the `tokenizers` crate) and its
//! chat template (`chat_template` of `tokenizer_config.json`, or `chat_template.jinja`),
//! rendered the way transformers' `apply_chat_template` does: a Jinja environment with
//! `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, Python
//! string methods, and `bos_token` / `eos_token` / `unk_token` / `pad_token` in the context.
//!
//! [`TextDeltas`] turns a growing list of generated ids into UTF-8-safe text pieces for
//! streaming: a byte-level token that ends inside a multi-byte character is held back until
//! the character is complete.

use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value, context};
use serde_json::Value as Json;

use crate::{Error, Result};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates decide what they accept).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A loaded tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn special(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let err = |msg: String| Error::Tokenizer {
            path: path.display().to_string(),
            msg,
        };
        if !path.exists() {
            return Err(err("no tokenizer.json in the model directory".into()));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
                path: cfg_path.display().to_string(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|e| Error::Config {
                path: cfg_path.display().to_string(),
                msg: format!("not valid JSON: {e}"),
            })?
        } else {
            Json::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.display().to_string(),
                source,
            })?)
        } else {
            match &cfg["chat_template"] {
                Json::String(s) => Some(s.clone()),
                // a list of named templates: the one called "default"
                Json::Array(a) => a
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token: special(&cfg["bos_token"]),
            eos_token: special(&cfg["eos_token"]),
            unk_token: special(&cfg["unk_token"]),
            pad_token: special(&cfg["pad_token"]),
            path,
        })
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.display().to_string(),
            msg: msg.to_string(),
        }
    }

    /// The ids of `text`; `add_special_tokens` runs the post-processor (LLaMA's BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    /// The id of a token string (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The EOS token's id, when tokenizer_config.json names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether the directory has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template like `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template(format!(
                "{} has no chat_template (tokenizer_config.json or chat_template.jinja)",
                self.path.display()
            ))
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            &SpecialTokens {
                bos: self.bos_token.as_deref(),
                eos: self.eos_token.as_deref(),
                unk: self.unk_token.as_deref(),
                pad: self.pad_token.as_deref(),
            },
        )
    }
}

/// The special-token strings a template may refer to.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpecialTokens<'a> {
    /// `bos_token`.
    pub bos: Option<&'a str>,
    /// `eos_token`.
    pub eos: Option<&'a str>,
    /// `unk_token`.
    pub unk: Option<&'a str>,
    /// `pad_token`.
    pub pad: Option<&'a str>,
}

/// Renders a chat template (see the module docs for the environment).
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    tokens: &SpecialTokens<'_>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        strftime_now(&fmt)
    });
    env.add_template("chat", template)
        .map_err(|e| Error::Template(format!("does not parse: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    let ctx = context! {
        messages => Value::from(
            messages
                .iter()
                .map(|m| {
                    Value::from_pairs([
                        ("role", Value::from(m.role.as_str())),
                        ("content", Value::from(m.content.as_str())),
                    ])
                })
                .collect::<Vec<_>>()
        ),
        add_generation_prompt => add_generation_prompt,
        bos_token => tokens.bos.unwrap_or(""),
        eos_token => tokens.eos.unwrap_or(""),
        unk_token => tokens.unk.unwrap_or(""),
        pad_token => tokens.pad.unwrap_or(""),
    };
    tmpl.render(ctx).map_err(|e| {
        // raise_exception's message is what the template author wrote for the user
        let detail = e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        Error::Template(detail)
    })
}

/// Today's date in the few `strftime` forms chat templates use (`%d %b %Y`, `%Y-%m-%d`).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%b", MONTHS[(m - 1) as usize])
}

/// Incremental, UTF-8-safe detokenization of one generated sequence.
#[derive(Clone, Debug, Default)]
pub struct TextDeltas {
    ids: Vec<u32>,
    /// Text already handed out.
    emitted: String,
}

impl TextDeltas {
    /// An empty stream.
    pub fn new() -> TextDeltas {
        TextDeltas::default()
    }

    /// Adds a token and returns the new text it completes (possibly empty while a character is
    /// incomplete; special tokens are skipped).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        // an incomplete byte sequence decodes to U+FFFD at the end: wait for more tokens
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return Ok(String::new());
        }
        let delta = text[self.emitted.len()..].to_string();
        self.emitted = text;
        Ok(delta)
    }

    /// Whatever is left (an incomplete character at the end becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids, true)?;
        let delta = text
            .strip_prefix(&self.emitted)
            .unwrap_or(&text)
            .to_string();
        self.emitted = text;
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_uses_python_methods_and_trims_blocks() {
        let t = "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}\n<{{ m.role }}>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let msgs = [
            Message::new("user", "  hi  "),
            Message::new("assistant", "yo"),
        ];
        let s = render_chat_template(t, &msgs, true, &SpecialTokens::default()).unwrap();
        assert_eq!(s, "<user>hi\n<assistant>yo\n<assistant>");
        let e = render_chat_template(
            t,
            &[Message::new("bad", "x")],
            false,
            &SpecialTokens::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no bad"), "{e}");
    }

    #[test]
    fn strftime_now_formats_a_date() {
        let s = strftime_now("%Y-%m-%d / %d %b %Y");
        assert_eq!(s.len(), "2026-12-02 / 02 Dec 2026".len(), "{s}");
    }
}
