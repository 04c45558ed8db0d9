;; image-affinity: an OnRequest middleware for vllm-router (`--wasm-middleware`, world `middleware`
;; of wit/router-middleware.wit). It gives every chat request that carries an image a session key
;; made from that image, so the router's session policies (sticky_least_loaded, consistent_hash)
;; send every question about one image to one replica, where its KV already is. vllm-router 0.1.17
;; makes no prefix decision for image requests (docs/deploy.md, "Many replicas"), and clients
;; should not have to send a key for this.
;;
;; For each request the router hands over (a fresh instance per request):
;;   - a request that already has an `x-session-id` header: left alone (the client's key wins);
;;   - otherwise the first `"image_url"` object's `"url"` string in the JSON body (a data URL or an
;;     http(s) URL, byte for byte as sent) is hashed with 64-bit FNV-1a and the request gets
;;     `x-session-id: image-<16 hex digits>`;
;;   - a request without an image (or a body this scan does not understand) is left alone.
;; The action goes back in the canonical ABI's memory layout (see the offsets below).
;;
;; Built by loadtests/router_middleware.py (`wasm-tools`, pinned in deploy/requirements/cpu.lock):
;;   wasm-tools parse | wasm-tools component embed wit --world middleware | wasm-tools component new
(module
  (memory (export "memory") 1)

  ;; Constants in memory (offsets are fixed; the heap for the host's allocations starts at 1024).
  (data (i32.const 256) "x-session-id")            ;; 12 bytes: the header set
  (data (i32.const 272) "\22image_url\22")          ;; 11 bytes: the key that starts an image part
  (data (i32.const 288) "\22url\22")                ;; 5 bytes: the key inside it
  (data (i32.const 304) "0123456789abcdef")
  (data (i32.const 320) "image-")                  ;; the header value: "image-" + 16 hex digits (22 bytes)
  ;; header record {name: string, value: list<u8>} at 352: four i32 (ptr, len, ptr, len)
  (data (i32.const 352) "\00\01\00\00\0c\00\00\00\40\01\00\00\16\00\00\00")
  ;; action at 384 (size 40, align 4): u8 case at 0 (0 continue, 1 reject, 2 modify), payload at 4:
  ;; headers-set (ptr, len) 4/8, headers-add 12/16, headers-remove 20/24, body-replace option: case 28,
  ;; ptr 32, len 36. Starts as `continue`; $modify fills it.

  (global $heap (mut i32) (i32.const 1024))

  ;; cabi_realloc(old_ptr, old_size, align, new_size): a bump allocator; the instance lives for one
  ;; request, so nothing is ever freed.
  (func $realloc (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    (local.set $ptr
      (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
               (i32.sub (i32.const 0) (local.get $align))))
    (local.set $end (i32.add (local.get $ptr) (local.get $size)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                                            (i32.const 16)))
                    (i32.const -1))
          (then unreachable))))
    (global.set $heap (local.get $end))
    (if (local.get $old)
      (then (memory.copy (local.get $ptr) (local.get $old) (local.get $old_size))))
    (local.get $ptr))

  ;; Whether the `len` bytes at `a` equal the lowercase ASCII bytes at `b`, ignoring ASCII case in `a`.
  (func $equals_lower (param $a i32) (param $b i32) (param $len i32) (result i32)
    (local $i i32)
    (block $differ
      (loop $next
        (if (i32.ge_u (local.get $i) (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ
          (i32.ne (i32.or (i32.load8_u (i32.add (local.get $a) (local.get $i))) (i32.const 32))
                  (i32.load8_u (i32.add (local.get $b) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; The address of the first occurrence of the `len` bytes at `needle` in [from, end), or -1.
  (func $find (param $from i32) (param $end i32) (param $needle i32) (param $len i32) (result i32)
    (local $at i32) (local $i i32)
    (local.set $at (local.get $from))
    (block $none
      (loop $next_at
        (br_if $none (i32.gt_u (i32.add (local.get $at) (local.get $len)) (local.get $end)))
        (local.set $i (i32.const 0))
        (block $differ
          (loop $next_byte
            (if (i32.ge_u (local.get $i) (local.get $len)) (then (return (local.get $at))))
            (br_if $differ
              (i32.ne (i32.load8_u (i32.add (local.get $at) (local.get $i)))
                      (i32.load8_u (i32.add (local.get $needle) (local.get $i)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $next_byte)))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $next_at)))
    (i32.const -1))

  ;; The first address in [at, end) that is not JSON whitespace (space, tab, newline, return).
  (func $skip_space (param $at i32) (param $end i32) (result i32)
    (local $c i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $at) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $at)))
        (br_if $done
          (i32.eqz (i32.or (i32.or (i32.eq (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 9)))
                           (i32.or (i32.eq (local.get $c) (i32.const 10)) (i32.eq (local.get $c) (i32.const 13))))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $next)))
    (local.get $at))

  ;; Turn the action at 384 into `modify`: set `x-session-id: image-<hex of $hash>`.
  (func $modify (param $hash i64)
    (local $i i32)
    (loop $digit
      (i32.store8 (i32.add (i32.const 326) (local.get $i))
        (i32.load8_u (i32.add (i32.const 304)
          (i32.wrap_i64 (i64.and (i64.shr_u (local.get $hash)
                                            (i64.extend_i32_u (i32.sub (i32.const 60) (i32.mul (local.get $i) (i32.const 4)))))
                                 (i64.const 15))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $digit (i32.lt_u (local.get $i) (i32.const 16))))
    (i32.store8 (i32.const 384) (i32.const 2))
    (i32.store (i32.const 388) (i32.const 352))
    (i32.store (i32.const 392) (i32.const 1)))

  (func (export "vllm:router-middleware/on-request@0.1.0#handle")
    (param $method i32) (param $method_len i32) (param $path i32) (param $path_len i32)
    (param $query i32) (param $query_len i32) (param $headers i32) (param $headers_len i32)
    (param $body i32) (param $body_len i32) (param $request_id i32) (param $request_id_len i32)
    (result i32)
    (local $i i32) (local $record i32) (local $end i32) (local $at i32) (local $c i32) (local $hash i64)
    ;; A key the client sent wins.
    (block $no_key
      (loop $next_header
        (br_if $no_key (i32.ge_u (local.get $i) (local.get $headers_len)))
        (local.set $record (i32.add (local.get $headers) (i32.mul (local.get $i) (i32.const 16))))
        (if (i32.eq (i32.load offset=4 (local.get $record)) (i32.const 12))
          (then
            (if (call $equals_lower (i32.load (local.get $record)) (i32.const 256) (i32.const 12))
              (then (return (i32.const 384))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next_header)))
    ;; "image_url" ... "url" <space> : <space> "<the url>"
    (local.set $end (i32.add (local.get $body) (local.get $body_len)))
    (local.set $at (call $find (local.get $body) (local.get $end) (i32.const 272) (i32.const 11)))
    (if (i32.eq (local.get $at) (i32.const -1)) (then (return (i32.const 384))))
    (local.set $at (call $find (i32.add (local.get $at) (i32.const 11)) (local.get $end) (i32.const 288) (i32.const 5)))
    (if (i32.eq (local.get $at) (i32.const -1)) (then (return (i32.const 384))))
    (local.set $at (call $skip_space (i32.add (local.get $at) (i32.const 5)) (local.get $end)))
    (if (i32.ge_u (local.get $at) (local.get $end)) (then (return (i32.const 384))))
    (if (i32.ne (i32.load8_u (local.get $at)) (i32.const 58)) (then (return (i32.const 384))))
    (local.set $at (call $skip_space (i32.add (local.get $at) (i32.const 1)) (local.get $end)))
    (if (i32.ge_u (local.get $at) (local.get $end)) (then (return (i32.const 384))))
    (if (i32.ne (i32.load8_u (local.get $at)) (i32.const 34)) (then (return (i32.const 384))))
    (local.set $at (i32.add (local.get $at) (i32.const 1)))
    ;; FNV-1a over the string's bytes up to its closing quote (a backslash escapes the next byte).
    (local.set $hash (i64.const 0xcbf29ce484222325))
    (block $closed
      (loop $next_byte
        (if (i32.ge_u (local.get $at) (local.get $end)) (then (return (i32.const 384))))
        (local.set $c (i32.load8_u (local.get $at)))
        (br_if $closed (i32.eq (local.get $c) (i32.const 34)))
        (if (i32.eq (local.get $c) (i32.const 92))
          (then
            (local.set $hash (i64.mul (i64.xor (local.get $hash) (i64.const 92)) (i64.const 0x100000001b3)))
            (local.set $at (i32.add (local.get $at) (i32.const 1)))
            (if (i32.ge_u (local.get $at) (local.get $end)) (then (return (i32.const 384))))
            (local.set $c (i32.load8_u (local.get $at)))))
        (local.set $hash (i64.mul (i64.xor (local.get $hash) (i64.extend_i32_u (local.get $c))) (i64.const 0x100000001b3)))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $next_byte)))
    (call $modify (local.get $hash))
    (i32.const 384))
)
