#!/usr/bin/env python3
"""Load a bundle tarball built by `sluice policy build` the way OPA does, with OPA's own engine, and evaluate queries.

OPA comes from the `opa-golib-python-bindings` wheel (libopabridge.so, OPA v1.20.2 in wheel 0.4.4; see
tools/opa_reference.py and policies/README.md for how to get it):

    OPA_BRIDGE_LIB=/tmp/opa-ref/wheel/opa_bindings/libopabridge.so \\
      python3 policies/tools/opa_bundle_check.py bundle.tar.gz \\
        [--verification-key pub.pem --verification-alg RS256 [--verification-key-id ID] [--use-jwt-kid]] \\
        [--query data.envoy.authz.allow ...] [--input in.json ...]

What is OPA's and what is this script's
---------------------------------------
The library only exports OpaAddPolicy / OpaAddData / OpaEvalQuery (no bundle loader: OPA's bundle.Reader is linked
in but not exported), so the steps of bundle.Reader.Read (OPA v1/bundle/bundle.go, verify.go, hash.go, file.go) are
replayed here, and every step that can be is done by OPA itself:
  - the signature of the JWT in .signatures.json: OPA's io.jwt.verify_<alg> builtin, with the verification key;
  - the digest of each file: OPA's crypto.sha256; for data.json/.manifest (structured files, hashed over their
    canonical JSON) the canonical text is made by OPA (json.marshal(json.unmarshal(...)): sorted keys, number literals
    kept as written), less the HTML escaping that Go's json.Marshal adds and the bundle hasher does not; an
    independent Python re-implementation of OPA's bundle hasher (hash.go `walk`) must agree, or the script stops;
  - parsing the modules and their package paths: OPA's rego.parse_module; compiling them: OpaAddPolicy;
  - the data document and the evaluation of the queries: OpaAddData / OpaEvalQuery.
The rest (which files are signed, keyid / scope rules, manifest decoding, roots vs packages and data, data.json
placement and merging) follows OPA's source and reproduces its error messages.

Verification key configuration, as in OPA:
  - default: like `opa eval/run --bundle B --verification-key K [--verification-key-id ID]`: the key is registered
    under ID ("default" unless given) and that ID is used whatever the JWT's kid says;
  - --use-jwt-kid: like a service bundle with `keys: {ID: {...}}` and no `signing.keyid`: the key id is taken from the
    JWT header's kid (else the payload's keyid) and must name the key ID.

Exit status: 0 when the bundle loads (and queries evaluate), 1 when OPA would refuse the bundle, 2 on usage errors or a
missing library, 3 when a query fails to evaluate. Only the standard library and ctypes are used.
"""

import argparse
import base64
import fnmatch
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
from pathlib import Path

from opa_reference import LIB_ENV  # noqa: E402,F401  (help text)


class Refused(Exception):
    """OPA would refuse the bundle: the message is OPA's (or as close as the replayed step allows)."""


# ----------------------------------------------------------------------------------------------------------- OPA ---

# The ctypes binding and library lookup are opa_reference.py's (same directory); this tool adds raw-JSON input.
from opa_reference import Opa as _Opa, OpaFailure, find_library  # noqa: E402


class Opa(_Opa):
    def add_data_json(self, text, path=""):
        self._call(self.lib.OpaAddData, path.encode(), text.encode())

    def value(self, ref, input_value=None, input_json=None):
        """Value of an expression (None when undefined). input_json: raw JSON text for the input, kept as written."""
        if input_json is None:
            return super().value(ref, input_value)
        env = self._call(self.lib.OpaEvalQuery, f"__x := {ref}".encode(), input_json.encode(), 0, 0)
        rs = env.get("result") or []
        return rs[0]["bindings"]["__x"] if rs else None


# --------------------------------------------------------------------- JSON as OPA's Go code reads and hashes it ---


class Num(str):
    """A JSON number kept as its literal text (Go's json.Number under UseNumber)."""


def _no_constant(name):
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


def _fix_surrogates(s):
    # Go's decoder turns a lone surrogate escape (\ud800) into U+FFFD.
    return re.sub("[\ud800-\udfff]", "\ufffd", s)


def _normalize(v):
    if isinstance(v, Num):
        return v
    if isinstance(v, str):
        return _fix_surrogates(v)
    if isinstance(v, list):
        return [_normalize(x) for x in v]
    if isinstance(v, dict):
        return {_fix_surrogates(k): _normalize(x) for k, x in v.items()}
    return v


def go_json_decode(data: bytes, first_value_only=False):
    """util.UnmarshalJSON / util.Unmarshal of JSON text: numbers kept as written, BOM dropped, last duplicate key wins."""
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]
    text = data.decode("utf-8", errors="replace")  # Go replaces invalid UTF-8 with U+FFFD
    dec = json.JSONDecoder(parse_float=Num, parse_int=Num, parse_constant=_no_constant)
    idx = len(text) - len(text.lstrip(" \t\r\n"))
    value, end = dec.raw_decode(text, idx)
    if not first_value_only and text[end:].strip(" \t\r\n"):
        raise ValueError("invalid character after top-level value")
    return _normalize(value)


_HEX = "0123456789abcdef"


def go_encode_string(s):
    """encoding/json string encoding with SetEscapeHTML(false), Go >= 1.22 (\\b and \\f short escapes)."""
    out = ['"']
    for ch in s:
        c = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif c < 0x20:
            out.append({8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}.get(c) or ("\\u00" + _HEX[c >> 4] + _HEX[c & 15]))
        elif c in (0x2028, 0x2029):
            out.append("\\u%04x" % c)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_walk(v, out):
    """bundle/hash.go walk(): the text whose digest OPA compares for structured files (data.json, .manifest)."""
    if isinstance(v, dict):
        out.append("{")
        for i, k in enumerate(sorted(v, key=lambda k: k.encode("utf-8"))):
            if i:
                out.append(",")
            out.append(go_encode_string(k))
            out.append(":")
            go_walk(v[k], out)
        out.append("}")
    elif isinstance(v, list):
        out.append("[")
        for i, x in enumerate(v):
            if i:
                out.append(",")
            go_walk(x, out)
        out.append("]")
    elif isinstance(v, Num):
        out.append(str.__str__(v))
    elif isinstance(v, str):
        out.append(go_encode_string(v))
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif v is None:
        out.append("null")
    else:
        raise TypeError(f"unexpected JSON value {v!r}")


def canonical(v):
    out = []
    go_walk(v, out)
    return "".join(out)


def undo_html_escape(text):
    """Go's json.Marshal (used by OPA's json.marshal) writes <, >, & as \\u003c, \\u003e, \\u0026; hash.go does not."""

    def repl(m):
        slashes = m.group(1)
        if len(slashes) % 2 == 0:  # the backslash before 'u' is itself escaped: literal text, leave it
            return m.group(0)
        return slashes[:-1] + {"3c": "<", "3e": ">", "26": "&"}[m.group(2)]

    return re.sub(r"(\\+)u00(3c|3e|26)", repl, text)


# ------------------------------------------------------------------------------------------------- bundle reader ---

STRUCTURED = {"data.json", "data.yaml", "signatures.json", ".manifest"}  # bundle.IsStructuredDoc
HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA-224": "sha224", "SHA-256": "sha256", "SHA-384": "sha384",
          "SHA-512": "sha512", "SHA-512-224": "sha512_224", "SHA-512-256": "sha512_256"}
JWT_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256", "HS384", "HS512"}


def b64url(part, what):
    if not re.fullmatch(r"[A-Za-z0-9_-]*", part) or len(part) % 4 == 1:
        raise Refused(f"failed to base64 decode JWT {what}: illegal base64 data")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def go_field(obj, name):
    """encoding/json matches struct fields exactly, else case-insensitively."""
    if name in obj:
        return obj[name]
    for k, v in obj.items():
        if k.lower() == name.lower():
            return v
    return None


def go_string(v, what):
    if v is None:
        return ""
    if not isinstance(v, str) or isinstance(v, Num):
        raise Refused(f"json: cannot unmarshal {type_name(v)} into Go struct field {what} of type string")
    return v


def type_name(v):
    if isinstance(v, Num):
        return "number"
    return {dict: "object", list: "array", str: "string", bool: "bool"}.get(type(v), "value")


def package_ptr(parsed_module):
    """ast.Ref.Ptr() of the module's package path: data.a.b -> "a/b" (url.PathEscape of each segment)."""
    terms = parsed_module["package"]["path"]
    segs = []
    for t in terms[1:]:
        if t.get("type") != "string":
            return None
        segs.append(re.sub(r"[^A-Za-z0-9\-_.~$&+:=@]", lambda m: "".join("%%%02X" % b for b in m.group(0).encode()), t["value"]))
    return "/".join(segs)


def root_contains(root, other):
    if len(root) == 1 and root[0] == "":
        return True
    if len(root) > len(other):
        return False
    return all(root[j] == other[j] for j in range(len(root)))


def root_paths_contain(roots, path):
    segs = path.split("/")
    return any(root_contains(r.split("/"), segs) for r in roots)


def merge_conflicts(a, b):
    for k in b:
        if k not in a:
            continue
        if not (isinstance(a[k], dict) and isinstance(b[k], dict)) or merge_conflicts(a[k], b[k]):
            return True
    return False


def merge(a, b):
    for k, v in b.items():
        if k in a and isinstance(a[k], dict) and isinstance(v, dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a


def read_tarball(path):
    try:
        raw = Path(path).read_bytes()
        tf = tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw)), mode="r:")
    except (OSError, EOFError, tarfile.TarError, gzip.BadGzipFile) as e:
        raise Refused(f"archive read failed: {e}")
    files = []
    for m in tf.getmembers():
        if m.isreg():  # tar.TypeReg (Go maps the old '\0' type to it too); directories and links are skipped
            files.append((m.name, tf.extractfile(m).read()))
    return files


def load_bundle(opa, path, args, log):
    files = read_tarball(path)
    log(f"tarball entries (regular files, in order): {[n for n, _ in files]}")

    # preProcessBundle: any file whose path ends in "signatures.json" is the signatures file.
    signatures = None
    descriptors = []
    for name, data in files:
        if name.endswith("signatures.json"):
            if args.skip_verification:
                continue
            try:
                sc = go_json_decode(data, first_value_only=True)
            except ValueError as e:
                raise Refused(f"bundle load failed on signatures decode: {e}")
            if not isinstance(sc, dict):
                raise Refused("bundle load failed on signatures decode: json: cannot unmarshal into SignaturesConfig")
            sigs = go_field(sc, "signatures")
            plugin = go_string(go_field(sc, "plugin"), "SignaturesConfig.plugin")
            if sigs is not None and not (isinstance(sigs, list) and all(isinstance(s, str) for s in sigs)):
                raise Refused("bundle load failed on signatures decode: signatures must be an array of strings")
            signatures = {"plugin": plugin, "signatures": sigs}
        else:
            if posixpath.basename(name) == "patch.json":
                raise Refused("delta bundles (patch.json) are not handled by this script")
            descriptors.append((name, data))

    signed = signatures is not None and (signatures["signatures"] is not None or signatures["plugin"] != "")
    have_key = args.verification_key is not None
    key_id_cfg = "" if args.use_jwt_kid else args.verification_key_id
    signed_files = {}
    if not args.skip_verification:
        if not signed and have_key and key_id_cfg != "":
            raise Refused("bundle missing .signatures.json file")
        if signed:
            if not have_key:
                raise Refused("verification key not provided")
            signed_files = verify_signature(opa, signatures, args, key_id_cfg, log)

    # Read every file: verify it against the signature, then sort it into modules, data, manifest.
    data_tree = {}
    manifest = None
    modules = []
    for name, data in descriptors:
        if signed:
            p = name[1:] if name.startswith("/") else name
            if any(fnmatch.fnmatchcase(p, g) for g in args.exclude):
                signed_files.pop(p, None)
            else:
                verify_file(opa, p, data, signed_files, log)
        base = posixpath.basename(name)
        if name.endswith(".rego"):
            modules.append((name, data))
        elif base in ("data.json", "data.yaml", "data.yml"):
            if base != "data.json":
                raise Refused(f"{name}: YAML data files are not handled by this script")
            try:
                value = go_json_decode(data)
            except ValueError as e:
                raise Refused(f"bundle load failed on {name}: {e}")
            dirpath = posixpath.normpath(posixpath.dirname(name) or ".").lstrip("/.")
            key = dirpath.split("/") if dirpath else []
            if not key:
                if not isinstance(value, dict):
                    raise Refused(f"bundle load failed on {name}: root value must be object")
                obj = value
            else:
                obj = value
                for seg in reversed(key):
                    obj = {seg: obj}
            if merge_conflicts(data_tree, obj):
                raise Refused(f"bundle load failed on {name}: failed to insert data file from path {'/'.join(key)}")
            merge(data_tree, obj)
            log(f"data file {name} -> data{''.join('.' + k for k in key)}")
        elif name.endswith(".manifest"):
            try:
                manifest = go_json_decode(data, first_value_only=True)
            except ValueError as e:
                raise Refused(f"bundle load failed on manifest decode: {e}")

    if signed and signed_files:
        raise Refused(f"file(s) {sorted(signed_files)} specified in bundle signatures but not found in the target bundle")

    # Manifest (Manifest struct; Init() defaults roots to [""]).
    revision, roots, rego_version = "", None, None
    if manifest is not None:
        if not isinstance(manifest, dict):
            raise Refused("bundle load failed on manifest decode: json: cannot unmarshal into bundle.Manifest")
        revision = go_string(go_field(manifest, "revision"), "Manifest.revision")
        r = go_field(manifest, "roots")
        if r is not None:
            if not isinstance(r, list) or not all(isinstance(x, str) and not isinstance(x, Num) for x in r):
                raise Refused("bundle load failed on manifest decode: roots must be an array of strings")
            roots = list(r)
        rv = go_field(manifest, "rego_version")
        if rv is not None:
            if not isinstance(rv, Num) or not re.fullmatch(r"-?\d+", rv):
                raise Refused(f"bundle load failed on manifest decode: json: cannot unmarshal {rv} into int")
            rego_version = int(rv)
        log(f"manifest: revision={revision!r} roots={roots} rego_version={rego_version} "
            f"other keys={sorted(k for k in manifest if k.lower() not in ('revision', 'roots', 'rego_version'))}")
    else:
        log("manifest: none (roots default to [\"\"])")
    if rego_version not in (None, 1):
        raise Refused(f"manifest rego_version {rego_version}: only Rego v1 bundles are handled by this script "
                      "(OPA would parse the modules as v0)")
    if roots is None:
        roots = [""]
    roots = [r.strip("/") for r in roots]

    # Parse modules with OPA (rego.parse_module), then validateAndInjectDefaults.
    parsed = []
    for name, data in modules:
        try:
            src = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Refused(f"{name}: rego_parse_error: invalid UTF-8: {e}")
        try:
            mod = opa.value("rego.parse_module(input.name, input.src)", {"name": name, "src": src})
        except OpaFailure as e:
            raise Refused(f"{name}: {e}")
        parsed.append((name, src, package_ptr(mod)))
    for i in range(len(roots)):
        for j in range(i + 1, len(roots)):
            a, b = roots[i].split("/"), roots[j].split("/")
            if root_contains(a, b) or root_contains(b, a):
                raise Refused(f"manifest has overlapped roots: '{roots[i]}' and '{roots[j]}'")
    for name, _, ptr in parsed:
        if ptr is None or not root_paths_contain(roots, ptr):
            pkg = ptr.replace("/", ".") if ptr else "?"
            raise Refused(f"manifest roots {roots} do not permit 'package {pkg}' in module '{name}'")
        log(f"module {name}: package path {ptr!r} is under a root")

    def dfs(value, p):
        p2 = p.strip("/")
        if root_paths_contain(roots, p2):
            return
        if isinstance(value, dict):
            if any(root_contains(p2.split("/"), r.split("/")) for r in roots):
                for k in value:
                    dfs(value[k], p + "/" + k)
                return
        raise Refused(f"manifest roots {roots} do not permit data at path '/{p2}' (hint: check bundle directory structure)")

    dfs(data_tree, "")

    # Activate: OPA parses and compiles the modules and takes the data.
    for name, src, _ in parsed:
        try:
            opa.add_policy(name, src)
        except OpaFailure as e:
            raise Refused(f"activation: {e}")
    if data_tree:
        try:
            opa.add_data_json(canonical(data_tree))
        except OpaFailure as e:
            raise Refused(f"activation (data): {e}")
    return {"revision": revision, "roots": roots, "modules": [n for n, _, _ in parsed], "signed": signed}


def verify_signature(opa, signatures, args, key_id_cfg, log):
    sigs = signatures["signatures"] or []
    if signatures["plugin"]:
        raise Refused(f"no verifier exists under id {signatures['plugin']}")
    if len(sigs) == 0:
        raise Refused(".signatures.json: missing JWT (expected exactly one)")
    if len(sigs) > 1:
        raise Refused(".signatures.json: multiple JWTs not supported (expected exactly one)")
    token = sigs[0]
    parts = token.split(".")
    if len(parts) != 3:
        raise Refused(f"invalid number of segments ({len(parts)})")
    try:
        hdr = json.loads(b64url(parts[0], "headers"))
    except ValueError as e:
        raise Refused(f"failed to parse JWT headers: {e}")
    try:
        payload = go_json_decode(b64url(parts[1], "payload"))
    except ValueError as e:
        raise Refused(str(e))
    if not isinstance(payload, dict):
        raise Refused("json: cannot unmarshal into Go value of type bundle.DecodedSignature")
    log(f"JWT header: {json.dumps(hdr, sort_keys=True)}")
    log(f"JWT payload keys: {sorted(payload)}")
    keyid = go_string(go_field(payload, "keyid"), "DecodedSignature.keyid")
    scope = go_string(go_field(payload, "scope"), "DecodedSignature.scope")
    go_string(go_field(payload, "iss"), "DecodedSignature.iss")
    iat = go_field(payload, "iat")
    if iat is not None and not (isinstance(iat, Num) and re.fullmatch(r"-?\d+", iat)):
        raise Refused(f"json: cannot unmarshal {type_name(iat)} {iat} into Go struct field DecodedSignature.iat of type int64")
    files = go_field(payload, "files")
    if files is not None and not isinstance(files, list):
        raise Refused("json: cannot unmarshal into Go struct field DecodedSignature.files of type []bundle.FileInfo")

    # Key id: the configured one, else the JWT header's kid, else the payload's keyid.
    kid = key_id_cfg or (hdr.get("kid") if isinstance(hdr.get("kid"), str) else "") or keyid
    if kid == "":
        raise Refused("verification key ID is empty")
    if kid != args.verification_key_id:
        raise Refused(f"verification key corresponding to ID {kid} not found")
    alg = args.verification_alg
    if alg not in JWT_ALGS:
        raise Refused(f"unknown signature algorithm: {alg}")
    if hdr.get("alg") != alg:
        raise Refused(f"could not verify message using any of the signatures or keys "
                      f"(JWT header alg {hdr.get('alg')!r}, key configured for {alg})")
    key = args.key_material
    try:
        ok = opa.value(f"io.jwt.verify_{alg.lower()}(input.token, input.key)", {"token": token, "key": key})
    except OpaFailure as e:
        raise Refused(f"failed to verify the JWT with OPA's io.jwt.verify_{alg.lower()}: {e}")
    if ok is not True:
        raise Refused(f"could not verify message using any of the signatures or keys "
                      f"(io.jwt.verify_{alg.lower()} returned {ok})")
    log(f"JWT signature verified by OPA (io.jwt.verify_{alg.lower()}), key id {kid!r}")
    if scope != args.scope:
        raise Refused("scope mismatch")
    out = {}
    for f in files or []:
        if not isinstance(f, dict):
            raise Refused("json: cannot unmarshal into Go struct field DecodedSignature.files of type bundle.FileInfo")
        name = go_string(go_field(f, "name"), "FileInfo.name")
        out[name] = {"hash": go_string(go_field(f, "hash"), "FileInfo.hash"),
                     "algorithm": go_string(go_field(f, "algorithm"), "FileInfo.algorithm")}
    log(f"signed files: {sorted(out)}")
    return out


def verify_file(opa, p, data, signed_files, log):
    fi = signed_files.get(p)
    if fi is None:
        raise Refused(f"file {p} not included in bundle signature")
    if fi["algorithm"] == "":
        raise Refused(f"no hashing algorithm provided for file {p}")
    if fi["algorithm"] not in HASHES:
        raise Refused(f"unsupported hashing algorithm: {fi['algorithm']}")
    h = HASHES[fi["algorithm"]]
    if posixpath.basename(p) in STRUCTURED:
        if posixpath.basename(p) == "data.yaml":
            raise Refused(f"{p}: YAML data files are not handled by this script")
        try:
            value = go_json_decode(data)
        except ValueError as e:
            raise Refused(f"{p}: {e}")
        mine = canonical(value)
        try:
            text = data.decode("utf-8", errors="replace")
            if text.startswith("\ufeff"):
                text = text[1:]
            by_opa = undo_html_escape(opa.value("json.marshal(json.unmarshal(input.s))", {"s": text}))
        except OpaFailure as e:
            raise Refused(f"{p}: OPA could not parse it as JSON: {e}")
        if by_opa != mine:
            sys.stderr.write(f"internal error: canonical JSON of {p} differs between OPA and this script:\n"
                             f"  OPA:    {by_opa!r}\n  script: {mine!r}\n")
            sys.exit(2)
        content = mine.encode("utf-8")
        kind = "canonical JSON"
    else:
        content = data
        kind = "raw bytes"
    got = hashlib.new(h, content).hexdigest()
    if h == "sha256":
        try:
            got_opa = opa.value("crypto.sha256(input.s)", {"s": content.decode("utf-8")})
            if got_opa != got:
                sys.stderr.write(f"internal error: sha256 of {p}: OPA {got_opa} vs hashlib {got}\n")
                sys.exit(2)
        except UnicodeDecodeError:
            pass
    want = fi["hash"]
    if not re.fullmatch(r"([0-9a-fA-F]{2})*", want):
        raise Refused(f"encoding/hex: invalid byte in hash of {p}")
    if want.lower() != got:
        raise Refused(f"{p}: digest mismatch (want: {want.lower()}, got: {got})")
    log(f"file {p}: {fi['algorithm']} over {kind} matches ({got})")
    del signed_files[p]


# --------------------------------------------------------------------------------------------------------- main ---


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="bundle .tar.gz built by `sluice policy build`")
    ap.add_argument("--lib", help=f"libopabridge.so (or set {LIB_ENV})")
    ap.add_argument("--verification-key", help="PEM public key (or HMAC secret file) to verify the bundle with")
    ap.add_argument("--verification-alg", default="RS256", help="algorithm of the key (default RS256, as OPA)")
    ap.add_argument("--verification-key-id", default="default", help="id the key is registered under (default: default)")
    ap.add_argument("--use-jwt-kid", action="store_true",
                    help="take the key id from the JWT (kid / keyid) instead of pinning --verification-key-id")
    ap.add_argument("--scope", default="", help="expected signature scope")
    ap.add_argument("--exclude", action="append", default=[], help="glob of files excluded from verification")
    ap.add_argument("--skip-verification", action="store_true")
    ap.add_argument("--query", action="append", default=[], help="query to evaluate (repeatable)")
    ap.add_argument("--input", action="append", default=[], help="input JSON file (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="print only the results")
    args = ap.parse_args()

    args.key_material = None
    if args.verification_key is not None:
        kp = Path(args.verification_key)
        args.key_material = kp.read_text() if kp.is_file() else args.verification_key

    opa = Opa(find_library(args.lib))
    log = (lambda m: None) if args.quiet else (lambda m: print(f"  {m}"))
    try:
        info = load_bundle(opa, args.bundle, args, log)
    except Refused as e:
        print(f"REFUSED: {args.bundle}: {e}")
        return 1
    print(f"LOADED: {args.bundle}: revision {info['revision']!r}, roots {info['roots']}, "
          f"{len(info['modules'])} modules, {'signature verified' if info['signed'] else 'unsigned'}")
    status = 0
    inputs = args.input or [None]
    for inp in inputs:
        input_json = Path(inp).read_text() if inp else None
        for q in args.query:
            try:
                v = opa.value(q, input_json=input_json)
                shown = "undefined" if v is None else json.dumps(v, sort_keys=True)
            except OpaFailure as e:
                shown = f"ERROR {e}"
                status = 3
            print(f"{inp or '-'}\t{q}\t{shown}")
    opa.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
