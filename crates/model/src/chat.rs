//! Chat templates: the file's `tokenizer.chat_template` rendered with
//! minijinja (with `minijinja-contrib`'s Python-compatibility methods, since
//! templates are written for Jinja2 in Python: `.strip()`, `.startswith()`,
//! `.items()` ...), or ChatML when the file has none.

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// ChatML, the fallback for files without a template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turn format, the fallback for Gemma files without a template
/// (the base models ship none): a system message opens the first user
/// turn, the assistant's role is `model`. Unlike Google's template it does
/// not insist that roles alternate, so agents' tool turns render.
pub const GEMMA: &str = "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with this role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The file's template; if it has none, Gemma's turns for a vocabulary
    /// with `<start_of_turn>` and `<end_of_turn>`, else ChatML.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if the template does not parse.
    pub fn from_gguf(file: &GgufFile, tokenizer: &Tokenizer) -> Result<Self> {
        let gemma = ["<start_of_turn>", "<end_of_turn>"].iter().all(|m| {
            (0..tokenizer.vocab_size() as u32).any(|i| tokenizer.token(i) == Some(m) && tokenizer.is_special(i))
        });
        let fallback = if gemma { GEMMA } else { CHATML };
        let source = file.string("tokenizer.chat_template").unwrap_or(fallback);
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.token(i)).unwrap_or_default().to_owned();
        Self::new(source, name(tokenizer.bos), name(tokenizer.eos))
    }

    /// Compiles `source`.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if it does not parse.
    pub fn new(source: &str, bos: String, eos: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned()).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// Renders a conversation, ending with the assistant's cue when
    /// `add_generation_prompt`.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if rendering fails (the template may reject a
    /// conversation, for example one that does not alternate roles).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_the_generation_cue() {
        let t = ChatTemplate::new(CHATML, String::new(), String::new()).unwrap();
        let s = t.render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_fallback_opens_the_first_user_turn_with_the_system_text() {
        let t = ChatTemplate::new(GEMMA, "<bos>".into(), "<eos>".into()).unwrap();
        let messages = [
            Message::new("system", "Be brief. "),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello."),
            Message::new("tool", "{}"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "HI");
        let err = t.render(&[Message::new("assistant", "x")], false).unwrap_err();
        assert!(err.to_string().contains("user first"), "{err}");
    }
}
