//! Splits PTX source into tokens with their line numbers; comments are dropped.

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Names, opcodes, directives, registers: `ld.global.f32`, `.reg`, `%tid.x`, `L_loop`.
    Ident,
    /// Numeric literal as written: `42`, `0x1F`, `0f3F800000`, `1.5e-3`.
    Num,
    /// A quoted string (only `.pragma` uses them; the parser rejects them).
    Str,
    /// One punctuation character.
    Punct(char),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Tok<'a> {
    pub kind: Kind,
    pub text: &'a str,
    pub line: u32,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || matches!(c, b'_' | b'$' | b'%' | b'.')
}

fn ident_cont(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.' | b':')
}

pub(crate) fn lex(src: &str) -> Result<Vec<Tok<'_>>> {
    let b = src.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    let mut line = 1u32;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let start = line;
                i += 2;
                loop {
                    if i + 1 >= b.len() {
                        return Err(Error::Parse {
                            line: start as usize,
                            msg: "unterminated `/*` comment".into(),
                        });
                    }
                    if b[i] == b'*' && b[i + 1] == b'/' {
                        i += 2;
                        break;
                    }
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            b'"' => {
                let s = i;
                i += 1;
                while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                    i += 1;
                }
                if i >= b.len() || b[i] != b'"' {
                    return Err(Error::Parse {
                        line: line as usize,
                        msg: "unterminated string".into(),
                    });
                }
                i += 1;
                toks.push(Tok {
                    kind: Kind::Str,
                    text: &src[s..i],
                    line,
                });
            }
            c if c.is_ascii_digit() => {
                let s = i;
                let hex = c == b'0'
                    && matches!(b.get(i + 1), Some(b'x' | b'X' | b'f' | b'F' | b'd' | b'D'));
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    // A decimal exponent may carry a sign: 1.5e-3.
                    if !hex
                        && matches!(b[i], b'e' | b'E')
                        && matches!(b.get(i + 1), Some(b'+' | b'-'))
                        && b.get(i + 2).is_some_and(|d| d.is_ascii_digit())
                    {
                        i += 2;
                    }
                    i += 1;
                }
                toks.push(Tok {
                    kind: Kind::Num,
                    text: &src[s..i],
                    line,
                });
            }
            c if ident_start(c) => {
                let s = i;
                i += 1;
                while i < b.len() && ident_cont(b[i]) {
                    // `::` appears in cache-hint qualifiers (`.L1::no_allocate`); a single `:` ends a label.
                    if b[i] == b':' {
                        if b.get(i + 1) == Some(&b':') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                toks.push(Tok {
                    kind: Kind::Ident,
                    text: &src[s..i],
                    line,
                });
            }
            b',' | b';' | b':' | b'[' | b']' | b'{' | b'}' | b'(' | b')' | b'+' | b'-' | b'|'
            | b'!' | b'@' | b'<' | b'>' | b'=' => {
                toks.push(Tok {
                    kind: Kind::Punct(c as char),
                    text: &src[i..i + 1],
                    line,
                });
                i += 1;
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(Error::Parse {
                    line: line as usize,
                    msg: format!("unexpected character `{ch}`"),
                });
            }
        }
    }
    Ok(toks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_instruction_with_comment_and_lines() {
        let t = lex("// c\n@!%p1 ld.global.v4.f32 {%f1,%f2}, [%rd1+-16]; /* x\n y */ L1:").unwrap();
        let texts: Vec<_> = t.iter().map(|t| t.text).collect();
        assert_eq!(
            texts,
            [
                "@",
                "!",
                "%p1",
                "ld.global.v4.f32",
                "{",
                "%f1",
                ",",
                "%f2",
                "}",
                ",",
                "[",
                "%rd1",
                "+",
                "-",
                "16",
                "]",
                ";",
                "L1",
                ":"
            ]
        );
        assert_eq!(t[0].line, 2);
        assert_eq!(t.last().unwrap().line, 3);
    }

    #[test]
    fn lexes_float_literals() {
        let t = lex("0f3F800000 1.5e-3 0x10").unwrap();
        assert!(t.iter().all(|t| t.kind == Kind::Num));
        assert_eq!(t[1].text, "1.5e-3");
    }
}
