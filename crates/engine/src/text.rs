//! Turning generated tokens into streamed text, and finding stop strings.
//!
//! Byte-level BPE tokens can end in the middle of a UTF-8 character, and a
//! token's text can depend on its neighbours, so each token's text is the
//! difference between decoding a short window with and without it (the
//! prefix/read offsets of text-generation-inference's `decode_token`); while
//! the window ends in an incomplete character nothing is released.
//!
//! Stop strings may span tokens: released text goes through a `pending`
//! buffer, and only the part that cannot be the start of a stop string
//! leaves it. When a stop string appears, the text before it is the last
//! text sent and the rest is dropped.

use model::TextCodec;

/// Incremental detokenizer plus stop-string matcher for one request.
#[derive(Debug, Default)]
pub(crate) struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    pending: String,
    stops: Vec<String>,
}

/// What one token adds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text safe to send now.
    pub(crate) text: String,
    /// A stop string was found; the request ends after `text`.
    pub(crate) stopped: bool,
}

impl TextStream {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self { stops, ..Self::default() }
    }

    /// Adds one generated token.
    ///
    /// # Errors
    /// The codec's error for an id it cannot decode.
    pub(crate) fn push(&mut self, codec: &dyn TextCodec, id: u32) -> model::Result<Released> {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = codec.decode(&self.ids[self.prefix_offset..])?;
        if after.len() > before.len() && !after.ends_with('\u{fffd}') && after.is_char_boundary(before.len()) {
            self.pending.push_str(&after[before.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.release())
    }

    /// Text still held back, released when the request ends without a stop
    /// string.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn release(&mut self) -> Released {
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let text = self.pending[..at].to_owned();
            self.pending.clear();
            return Released { text, stopped: true };
        }
        let keep = self.longest_stop_prefix_suffix();
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        Released { text, stopped: false }
    }

    /// Length of the longest suffix of `pending` that begins some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let p = &self.pending;
        (1..=p.len())
            .rev()
            .filter(|&n| p.is_char_boundary(p.len() - n))
            .find(|&n| self.stops.iter().any(|s| s.starts_with(&p[p.len() - n..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeCodec;

    fn run(stops: &[&str], text: &str) -> (Vec<String>, bool, String) {
        let codec = FakeCodec::new();
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for id in codec.encode(text).unwrap() {
            let r = s.push(&codec, id).unwrap();
            out.push(r.text);
            if r.stopped {
                return (out, true, String::new());
            }
        }
        let rest = s.flush();
        (out, false, rest)
    }

    #[test]
    fn multibyte_characters_are_released_whole() {
        let (out, stopped, rest) = run(&[], "aé€😀b");
        assert!(!stopped);
        assert_eq!(out.concat() + &rest, "aé€😀b");
        assert!(out.iter().all(|t| t.chars().all(|c| c != '\u{fffd}')));
        // "é" is two byte tokens: the first releases nothing.
        assert_eq!(out[1], "");
        assert_eq!(out[2], "é");
    }

    #[test]
    fn stop_strings_spanning_tokens_end_the_text_before_them() {
        let (out, stopped, _) = run(&["END"], "hello ENDworld");
        assert!(stopped);
        assert_eq!(out.concat(), "hello ");
        // "E" and "EN" were held back while they could start "END".
        assert_eq!(out[6], "");
        assert_eq!(out[7], "");
    }

    #[test]
    fn a_near_miss_is_released_when_it_stops_matching() {
        let (out, stopped, rest) = run(&["ENDX"], "aENDb");
        assert!(!stopped);
        assert_eq!(out.concat() + &rest, "aENDb");
        let (out, _, rest) = run(&["xyz"], "abxy");
        assert_eq!(out.concat(), "ab");
        assert_eq!(rest, "xy", "a possible stop prefix is held until the end");
    }
}
