//! `multipart/form-data` read the way Go's `mime/multipart` `Reader.NextPart` reads it, and Go's
//! `mime.ParseMediaType`.
//!
//! OPA-Envoy (and most Go backends) read form bodies with those functions. A reader that differs
//! can show the policy a field the backend never reads, or hide one it does, so this module
//! follows Go's rules one by one: boundaries only at line starts and followed by whitespace or `--`,
//! LF-only bodies detected on the first delimiter, lines longer than Go's 4096-byte buffer refused,
//! part headers parsed like `net/textproto` (case-insensitive names, folded lines, the first of
//! repeated headers wins), RFC 2231 parameters, and quoted-printable parts decoded. Where Go's
//! reader would resynchronise in the middle of a part (a nameless quoted-printable part that fails
//! to decode), the body is refused instead.

use std::collections::HashMap;

/// Go's `bufio` size for the multipart reader: a line between parts must fit in it.
const PEEK_BUFFER_SIZE: usize = 4096;
/// `mime/multipart.maxMIMEHeaderSize`.
const MAX_MIME_HEADER_SIZE: i64 = 10 << 20;
/// `mime/multipart.maxMIMEHeaders()` (default).
const MAX_MIME_HEADERS: i64 = 10_000;

/// Why a multipart body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("boundary is empty")]
    EmptyBoundary,
    #[error("body ends before the closing boundary")]
    UnexpectedEof,
    #[error("a line between parts is longer than {PEEK_BUFFER_SIZE} bytes")]
    LineTooLong,
    #[error("expecting a new part; got line {0:?}")]
    ExpectingNewPart(String),
    #[error("unexpected line between parts: {0:?}")]
    UnexpectedLine(String),
    #[error("malformed part header: {0}")]
    MalformedHeader(String),
    #[error("part headers are too large")]
    HeadersTooLarge,
    #[error("quoted-printable: {0}")]
    QuotedPrintable(String),
    #[error("form field name is not valid UTF-8")]
    NameNotUtf8,
}

/// Why `parse_media_type` refused a value (Go's `mime` errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaTypeError {
    #[error("mime: no media type")]
    NoMediaType,
    #[error("mime: expected slash after first token")]
    NoSlashAfterFirstToken,
    #[error("mime: expected token after slash")]
    NoTokenAfterSlash,
    #[error("mime: unexpected content after media subtype")]
    UnexpectedContentAfterSubtype,
    #[error("mime: invalid media parameter")]
    InvalidParameter {
        /// The media type, which Go still returns with this error.
        media_type: String,
    },
    #[error("mime: duplicate parameter name")]
    DuplicateParameter,
}

/// A media type and its parameters; parameter values are bytes, as Go strings are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    /// Lower-cased `type/subtype` (or disposition).
    pub essence: String,
    pub params: HashMap<String, Vec<u8>>,
}

/// One form field as OPA-Envoy reads it: a part whose `FormName()` is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormField {
    pub name: String,
    /// The part's first `Content-Type` header value, or empty.
    pub content_type: Vec<u8>,
    /// The part's content, quoted-printable decoded when the part says so.
    pub value: Vec<u8>,
}

/// Reads every part of a `multipart/form-data` body like repeated `Reader.NextPart` calls, keeping
/// the parts with a form name (`Content-Disposition: form-data; name=...`).
pub fn read_form(payload: &[u8], boundary: &[u8]) -> Result<Vec<FormField>, MultipartError> {
    if boundary.is_empty() {
        return Err(MultipartError::EmptyBoundary);
    }
    let dash_boundary = [b"--", boundary].concat();
    let mut reader = PartReader {
        payload,
        pos: 0,
        parts_read: 0,
        crlf: true,
        dash_boundary: &dash_boundary,
    };
    let mut fields = Vec::new();
    while reader.next_part()? {
        // Go returns the bare io.EOF of a body that ends where a header line should start, and
        // OPA-Envoy takes that for the end of the form.
        let Some(headers) = read_mime_header(payload, &mut reader.pos)? else {
            break;
        };
        let content = reader.part_content()?;
        let name = form_name(&headers);
        let qp = header(&headers, "content-transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"quoted-printable"));
        let value = if qp {
            // Go decodes a nameless part too while skipping it; if that fails it resumes reading
            // lines from wherever the decoder stopped, so refuse rather than guess.
            decode_quoted_printable(content)?
        } else {
            content.to_vec()
        };
        let Some(name) = name else { continue };
        let name = String::from_utf8(name).map_err(|_| MultipartError::NameNotUtf8)?;
        fields.push(FormField {
            name,
            content_type: header(&headers, "content-type")
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
            value,
        });
    }
    Ok(fields)
}

struct PartReader<'a> {
    payload: &'a [u8],
    pos: usize,
    parts_read: usize,
    /// Lines end in CRLF; switched off when the first delimiter line ends in a bare LF, as Go does.
    crlf: bool,
    dash_boundary: &'a [u8],
}

impl PartReader<'_> {
    fn nl(&self) -> &'static [u8] {
        if self.crlf { b"\r\n" } else { b"\n" }
    }

    /// `nextPart`: `true` when positioned at a new part's headers, `false` after the final boundary.
    fn next_part(&mut self) -> Result<bool, MultipartError> {
        let mut expect_new_part = false;
        loop {
            let rest = &self.payload[self.pos..];
            let (line, at_eof) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) if i < PEEK_BUFFER_SIZE => (&rest[..=i], false),
                Some(_) => return Err(MultipartError::LineTooLong),
                None if rest.len() >= PEEK_BUFFER_SIZE => return Err(MultipartError::LineTooLong),
                None => (rest, true),
            };
            if at_eof {
                return if self.is_final_boundary(line) {
                    Ok(false)
                } else {
                    Err(MultipartError::UnexpectedEof)
                };
            }
            self.pos += line.len();
            if self.is_boundary_delimiter_line(line) {
                self.parts_read += 1;
                return Ok(true);
            }
            if self.is_final_boundary(line) {
                return Ok(false);
            }
            if expect_new_part {
                return Err(MultipartError::ExpectingNewPart(lossy_line(line)));
            }
            if self.parts_read == 0 {
                continue; // preamble
            }
            if line == self.nl() {
                expect_new_part = true;
                continue;
            }
            return Err(MultipartError::UnexpectedLine(lossy_line(line)));
        }
    }

    fn is_final_boundary(&self, line: &[u8]) -> bool {
        let Some(rest) = line
            .strip_prefix(self.dash_boundary)
            .and_then(|r| r.strip_prefix(b"--"))
        else {
            return false;
        };
        let rest = skip_lwsp(rest);
        rest.is_empty() || rest == self.nl()
    }

    fn is_boundary_delimiter_line(&mut self, line: &[u8]) -> bool {
        let Some(rest) = line.strip_prefix(self.dash_boundary) else {
            return false;
        };
        let rest = skip_lwsp(rest);
        if self.parts_read == 0 && rest == b"\n" {
            self.crlf = false;
        }
        rest == self.nl()
    }

    /// The part's content: up to the next `nl--boundary` that is followed by whitespace, `--` or
    /// the end (`scanUntilBoundary` over the whole body). Leaves `pos` at that delimiter.
    fn part_content(&mut self) -> Result<&[u8], MultipartError> {
        let start = self.pos;
        let buf = &self.payload[start..];
        let mut scan = 0;
        if buf.starts_with(self.dash_boundary) {
            if ends_boundary(buf, self.dash_boundary.len()) {
                return Ok(&buf[..0]);
            }
            scan = self.dash_boundary.len();
        } else if self.dash_boundary.starts_with(buf) {
            return Err(MultipartError::UnexpectedEof);
        }
        let nl_dash_boundary = [self.nl(), self.dash_boundary].concat();
        loop {
            let Some(i) = find(&buf[scan..], &nl_dash_boundary) else {
                return Err(MultipartError::UnexpectedEof);
            };
            let at = scan + i;
            if ends_boundary(&buf[at..], nl_dash_boundary.len()) {
                self.pos = start + at;
                return Ok(&buf[..at]);
            }
            scan = at + nl_dash_boundary.len();
        }
    }
}

/// `matchAfterPrefix` at the end of the input: is the delimiter at `buf[..prefix_len]` a boundary?
fn ends_boundary(buf: &[u8], prefix_len: usize) -> bool {
    match buf.get(prefix_len) {
        None => true,
        Some(b' ' | b'\t' | b'\r' | b'\n') => true,
        Some(b'-') => buf.get(prefix_len + 1) == Some(&b'-'),
        Some(_) => false,
    }
}

/// Linear-time search: the boundary comes from the request, so a naive scan would let a long one
/// make each body cost `body × boundary`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

fn skip_lwsp(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    b
}

fn lossy_line(line: &[u8]) -> String {
    let shown = &line[..line.len().min(80)];
    String::from_utf8_lossy(shown).into_owned()
}

/// A part header: the name as written (for case-insensitive lookup) and the value.
struct Header {
    /// `None` when the name has a space before the colon: Go keeps it, but never canonicalizes
    /// it, so `Header.Get` cannot find it.
    lower_name: Option<String>,
    value: Vec<u8>,
}

/// `Header.Get`: the first value of a header, names compared case-insensitively.
fn header<'h>(headers: &'h [Header], lower_name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|h| h.lower_name.as_deref() == Some(lower_name))
        .map(|h| h.value.as_slice())
}

/// `Part.FormName`: the `name` parameter when the disposition is `form-data`, if not empty.
fn form_name(headers: &[Header]) -> Option<Vec<u8>> {
    let disposition = header(headers, "content-disposition").unwrap_or_default();
    let media = parse_media_type(disposition).ok()?;
    if media.essence != "form-data" {
        return None;
    }
    media.params.get("name").filter(|n| !n.is_empty()).cloned()
}

/// `bufio.Reader.ReadLine` over the whole body: the line without `\n` or `\r\n`; an error at the end.
fn read_line<'a>(payload: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = &payload[*pos..];
    if rest.is_empty() {
        return None;
    }
    let (line, used) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let line = &rest[..i];
            (line.strip_suffix(b"\r").unwrap_or(line), i + 1)
        }
        None => (rest, rest.len()),
    };
    *pos += used;
    Some(line)
}

fn trim_lwsp(b: &[u8]) -> &[u8] {
    let b = skip_lwsp(b);
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |i| i + 1);
    &b[..end]
}

/// `textproto.readMIMEHeader` with multipart's limits; `None` when the body ends where a header
/// line should start.
fn read_mime_header(
    payload: &[u8],
    pos: &mut usize,
) -> Result<Option<Vec<Header>>, MultipartError> {
    let malformed = |kv: &[u8]| MultipartError::MalformedHeader(lossy_line(kv));
    if let Some(b' ' | b'\t') = payload.get(*pos) {
        let mut p = *pos;
        let line = read_line(payload, &mut p).unwrap_or_default();
        return Err(malformed(line));
    }
    let mut max_memory = MAX_MIME_HEADER_SIZE - 400;
    let mut max_headers = MAX_MIME_HEADERS;
    let mut headers: Vec<Header> = Vec::new();
    loop {
        let Some(line) = read_line(payload, pos) else {
            return Ok(None);
        };
        if i64::try_from(line.len()).unwrap_or(i64::MAX) > max_memory {
            return Err(MultipartError::HeadersTooLarge);
        }
        if line.is_empty() {
            return Ok(Some(headers));
        }
        if !line.contains(&b':') {
            return Err(malformed(line));
        }
        let mut kv = trim_lwsp(line).to_vec();
        // Continuation lines (starting with space or tab) are joined with one space.
        loop {
            let spaces = payload[*pos..]
                .iter()
                .take_while(|&&c| c == b' ' || c == b'\t')
                .count();
            if spaces == 0 {
                break;
            }
            *pos += spaces;
            kv.push(b' ');
            if i64::try_from(kv.len()).unwrap_or(i64::MAX) >= max_memory {
                return Err(MultipartError::HeadersTooLarge);
            }
            match read_line(payload, pos) {
                Some(more) => kv.extend_from_slice(trim_lwsp(more)),
                None => break,
            }
        }
        let colon = kv.iter().position(|&c| c == b':').unwrap_or(kv.len());
        let (name, value) = (&kv[..colon], &kv[(colon + 1).min(kv.len())..]);
        if name.is_empty() {
            return Err(malformed(&kv));
        }
        let mut has_space = false;
        for &c in name {
            match c {
                b' ' => has_space = true,
                c if is_token_char(c) => {}
                _ => return Err(malformed(&kv)),
            }
        }
        if !value.iter().all(|&c| valid_header_value_byte(c)) {
            return Err(malformed(&kv));
        }
        max_headers -= 1;
        if max_headers < 0 {
            return Err(MultipartError::HeadersTooLarge);
        }
        let value = skip_lwsp(value).to_vec();
        let lower_name = (!has_space).then(|| String::from_utf8_lossy(name).to_ascii_lowercase());
        let len = |b: &[u8]| i64::try_from(b.len()).unwrap_or(i64::MAX);
        if !headers.iter().any(|h| h.lower_name == lower_name) {
            max_memory -= len(name) + 200;
        }
        max_memory -= len(&value);
        if max_memory < 0 {
            return Err(MultipartError::HeadersTooLarge);
        }
        headers.push(Header { lower_name, value });
    }
}

fn valid_header_value_byte(c: u8) -> bool {
    c == b'\t' || (0x20..=0x7e).contains(&c) || c >= 0x80
}

/// RFC 2045 token characters (`mime.isTokenChar`; the same set as `textproto`'s header names).
fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_tspecial(c: u8) -> bool {
    b"()<>@,;:\\\"/[]?=".contains(&c)
}

/// Length of the leading Unicode white space (Go's `unicode.IsSpace`, which is Rust's
/// `char::is_whitespace`); invalid UTF-8 is not space.
fn leading_space(b: &[u8]) -> usize {
    let mut i = 0;
    while let Some(c) = first_char(&b[i..]) {
        if !c.is_whitespace() {
            break;
        }
        i += c.len_utf8();
    }
    i
}

fn first_char(b: &[u8]) -> Option<char> {
    let head = &b[..b.len().min(4)];
    let valid = match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
    };
    valid.chars().next()
}

fn trim_space(b: &[u8]) -> &[u8] {
    let b = &b[leading_space(b)..];
    let mut end = b.len();
    // Trailing white space, one character at a time from the end.
    'outer: while end > 0 {
        for width in 1..=end.min(4) {
            if let Ok(s) = std::str::from_utf8(&b[end - width..end]) {
                match s.chars().next() {
                    Some(c) if c.len_utf8() == width && c.is_whitespace() => {
                        end -= width;
                        continue 'outer;
                    }
                    _ => break 'outer,
                }
            }
        }
        break;
    }
    &b[..end]
}

/// Go's `strings.ToLower` as far as it matters here: the only non-ASCII characters whose simple
/// lower case is ASCII are KELVIN SIGN and LATIN CAPITAL LETTER I WITH DOT ABOVE.
fn go_to_lower(b: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(b) {
        Ok(s) if !s.is_ascii() => {
            let mut out = String::with_capacity(s.len());
            for c in s.chars() {
                match c {
                    '\u{212A}' => out.push('k'),
                    '\u{130}' => out.push('i'),
                    c if c.is_ascii() => out.push(c.to_ascii_lowercase()),
                    c => out.extend(c.to_lowercase()),
                }
            }
            out.into_bytes()
        }
        _ => b.to_ascii_lowercase(),
    }
}

fn consume_token(v: &[u8]) -> (&[u8], &[u8]) {
    let n = v.iter().take_while(|&&c| is_token_char(c)).count();
    v.split_at(n)
}

/// A token or a quoted string (unescaped); `None` on failure.
fn consume_value(v: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    if v.first() != Some(&b'"') {
        let (token, rest) = consume_token(v);
        return (!token.is_empty()).then(|| (token.to_vec(), rest));
    }
    let mut out = Vec::new();
    let mut i = 1;
    while i < v.len() {
        match v[i] {
            b'"' => return Some((out, &v[i + 1..])),
            b'\\' if i + 1 < v.len() && is_tspecial(v[i + 1]) => {
                out.push(v[i + 1]);
                i += 1;
            }
            b'\r' | b'\n' => return None,
            c => out.push(c),
        }
        i += 1;
    }
    None
}

/// `; name = value`, returning the lower-cased name, the value and the rest.
fn consume_media_param(v: &[u8]) -> Option<(String, Vec<u8>, &[u8])> {
    let rest = &v[leading_space(v)..];
    let rest = rest.strip_prefix(b";")?;
    let rest = &rest[leading_space(rest)..];
    let (name, rest) = consume_token(rest);
    if name.is_empty() {
        return None;
    }
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let rest = &rest[leading_space(rest)..];
    let rest = rest.strip_prefix(b"=")?;
    let rest = &rest[leading_space(rest)..];
    let (value, rest) = consume_value(rest)?;
    Some((name, value, rest))
}

fn check_media_type_disposition(s: &[u8]) -> Result<(), MediaTypeError> {
    let (kind, rest) = consume_token(s);
    if kind.is_empty() {
        return Err(MediaTypeError::NoMediaType);
    }
    if rest.is_empty() {
        return Ok(());
    }
    let rest = rest
        .strip_prefix(b"/")
        .ok_or(MediaTypeError::NoSlashAfterFirstToken)?;
    let (subtype, rest) = consume_token(rest);
    if subtype.is_empty() {
        return Err(MediaTypeError::NoTokenAfterSlash);
    }
    if !rest.is_empty() {
        return Err(MediaTypeError::UnexpectedContentAfterSubtype);
    }
    Ok(())
}

/// Go's `mime.ParseMediaType` (RFC 1521 / RFC 2183 / RFC 2231).
pub fn parse_media_type(v: &[u8]) -> Result<MediaType, MediaTypeError> {
    let base_len = v.iter().position(|&c| c == b';').unwrap_or(v.len());
    let lowered = go_to_lower(&v[..base_len]);
    let essence = trim_space(&lowered);
    check_media_type_disposition(essence)?;
    let essence = String::from_utf8_lossy(essence).into_owned();
    let mut params: HashMap<String, Vec<u8>> = HashMap::new();
    // Base name -> parameter name -> value, for names with a `*` (RFC 2231).
    let mut continuation: HashMap<String, HashMap<String, Vec<u8>>> = HashMap::new();
    let mut rest = &v[base_len..];
    loop {
        rest = &rest[leading_space(rest)..];
        if rest.is_empty() {
            break;
        }
        let Some((name, value, after)) = consume_media_param(rest) else {
            if trim_space(rest) == b";" {
                break; // a trailing semicolon is not an error
            }
            return Err(MediaTypeError::InvalidParameter {
                media_type: essence,
            });
        };
        let map = match name.split_once('*') {
            Some((base, _)) => continuation.entry(base.to_owned()).or_default(),
            None => &mut params,
        };
        if map.get(&name).is_some_and(|existing| *existing != value) {
            return Err(MediaTypeError::DuplicateParameter);
        }
        map.insert(name, value);
        rest = after;
    }
    for (key, pieces) in continuation {
        if let Some(v) = pieces.get(&format!("{key}*")) {
            if let Some(decoded) = decode_2231(v) {
                params.insert(key, decoded);
            }
            continue;
        }
        let mut value = Vec::new();
        let mut valid = false;
        for n in 0.. {
            let simple = format!("{key}*{n}");
            if let Some(v) = pieces.get(&simple) {
                valid = true;
                value.extend_from_slice(v);
                continue;
            }
            let Some(v) = pieces.get(&format!("{simple}*")) else {
                break;
            };
            valid = true;
            if n == 0 {
                if let Some(decoded) = decode_2231(v) {
                    value.extend_from_slice(&decoded);
                }
            } else {
                value.extend_from_slice(&percent_unescape(v).unwrap_or_default());
            }
        }
        if valid {
            params.insert(key, value);
        }
    }
    Ok(MediaType { essence, params })
}

/// `charset'language'percent-encoded`, for `us-ascii` and `utf-8` only.
fn decode_2231(v: &[u8]) -> Option<Vec<u8>> {
    let quote = v.iter().position(|&c| c == b'\'')?;
    let (charset, rest) = (&v[..quote], &v[quote + 1..]);
    let quote = rest.iter().position(|&c| c == b'\'')?;
    let encoded = &rest[quote + 1..];
    let charset = charset.to_ascii_lowercase();
    if charset != b"us-ascii" && charset != b"utf-8" {
        return None;
    }
    percent_unescape(encoded)
}

fn percent_unescape(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hi = s.get(i + 1).copied().and_then(hex)?;
            let lo = s.get(i + 2).copied().and_then(hex)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Go's `quotedprintable.Reader` over a whole part, as `io.ReadAll` reads it.
pub fn decode_quoted_printable(src: &[u8]) -> Result<Vec<u8>, MultipartError> {
    let qp_error = |m: String| MultipartError::QuotedPrintable(m);
    let mut out = Vec::with_capacity(src.len());
    let mut pos = 0;
    while pos < src.len() {
        let rest = &src[pos..];
        // bufio.Reader (4096 bytes) ReadSlice('\n').
        let (whole, at_eof, too_long) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) if i < PEEK_BUFFER_SIZE => (&rest[..=i], false, false),
            _ if rest.len() >= PEEK_BUFFER_SIZE => (&rest[..PEEK_BUFFER_SIZE], false, true),
            _ => (rest, true, false),
        };
        pos += whole.len();
        let has_lf = whole.ends_with(b"\n");
        let has_cr = whole.ends_with(b"\r\n");
        let trimmed_len = whole
            .iter()
            .rposition(|c| !matches!(c, b'\n' | b'\r' | b' ' | b'\t'))
            .map_or(0, |i| i + 1);
        let mut line = whole[..trimmed_len].to_vec();
        let mut line_error = None;
        if line.last() == Some(&b'=') {
            let right = skip_lwsp(&whole[trimmed_len..]);
            line.pop();
            let soft_break = right.starts_with(b"\n") || right.starts_with(b"\r\n");
            let at_end = right.is_empty() && !line.is_empty() && at_eof;
            if !soft_break && !at_end {
                line_error = Some(format!(
                    "invalid bytes after =: {:?}",
                    String::from_utf8_lossy(right)
                ));
            }
        } else if has_lf {
            line.extend_from_slice(if has_cr { b"\r\n" } else { b"\n" });
        }
        let mut i = 0;
        while i < line.len() {
            let mut b = line[i];
            match b {
                b'=' => match hex_byte(&line[i + 1..]) {
                    Ok(decoded) => {
                        b = decoded;
                        i += 2;
                    }
                    Err(_) if line.len() >= i + 2 && !matches!(line[i + 1], b'\r' | b'\n') => {}
                    Err(e) => return Err(qp_error(e)),
                },
                b'\t' | b'\r' | b'\n' => {}
                0x80.. => {}
                c if !(b' '..=b'~').contains(&c) => {
                    return Err(qp_error(format!("invalid unescaped byte {c:#04x} in body")));
                }
                _ => {}
            }
            out.push(b);
            i += 1;
        }
        if let Some(e) = line_error {
            return Err(qp_error(e));
        }
        if too_long {
            return Err(qp_error("line longer than 4096 bytes".into()));
        }
    }
    Ok(out)
}

fn hex_byte(v: &[u8]) -> Result<u8, String> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'A'..=b'F' | b'a'..=b'f' => Ok((b | 0x20) - b'a' + 10),
        _ => Err(format!("invalid hex byte {b:#04x}")),
    };
    match v {
        [h, l, ..] => Ok(digit(*h)? << 4 | digit(*l)?),
        _ => Err("unexpected EOF".into()),
    }
}

#[cfg(test)]
mod tests;
