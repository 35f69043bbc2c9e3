// tokenizer.js — the CLIP tokenizer of a bundle: prompt -> 77 int64 ids, exactly as the Python runtime's
// ClipTokenizer (meissonic_edge/runtime/tokenizer.py): bos, at most 75 text tokens, eos, then the pad token.
//
// The BPE itself (normalizer, CLIP's word split, byte-level BPE with `</w>`) runs in Hugging Face's
// @huggingface/tokenizers (pure JavaScript, no dependencies), from the bundle's own tokenizer.json. This
// module only adds what the Python side configures around it: truncation to 75 text tokens and padding.
// Checked against the Python runtime's ids on ~300 prompts per bundle (test/unit/tokenizer.test.mjs).

import { Tokenizer } from "@huggingface/tokenizers";

export const MAX_LENGTH = 77; // CLIP's context: bos + 75 text tokens + eos
const DEFAULT_SPECIAL_TOKENS = {
  bos_token: "<|startoftext|>",
  eos_token: "<|endoftext|>",
  pad_token: "<|endoftext|>",
};

const content = (value) => (typeof value === "string" ? value : value && value.content);

/** bos/eos/pad names as transformers resolves them: defaults, then tokenizer_config.json, then the map. */
function specialTokenNames(config, specialMap) {
  const names = { ...DEFAULT_SPECIAL_TOKENS };
  for (const key of Object.keys(names)) if (content(config[key])) names[key] = content(config[key]);
  if (!("added_tokens_decoder" in config) && specialMap) {
    for (const key of Object.keys(names)) if (content(specialMap[key])) names[key] = content(specialMap[key]);
  }
  return names;
}

export class ClipTokenizer {
  /**
   * tokenizerJson: the parsed tokenizer.json; config: tokenizer_config.json (or {}); specialMap:
   * special_tokens_map.json (or null).
   */
  constructor(tokenizerJson, config = {}, specialMap = null) {
    this.tokenizer = new Tokenizer(tokenizerJson, config);
    const names = specialTokenNames(config, specialMap);
    const post = tokenizerJson.post_processor;
    // The ids the post-processor wraps the text in (RobertaProcessing: cls ... sep), else the named tokens.
    const bosName = post && post.cls ? post.cls[0] : names.bos_token;
    const eosName = post && post.sep ? post.sep[0] : names.eos_token;
    this.bos = this.idOf(bosName, "bos");
    this.eos = this.idOf(eosName, "eos");
    this.pad = this.idOf(names.pad_token, "pad");
  }

  idOf(token, role) {
    const id = this.tokenizer.token_to_id(token);
    if (id === undefined) throw new Error(`the tokenizer's ${role} token '${token}' is not in its vocabulary`);
    return id;
  }

  /** Load from a bundle: `readText(relativePath)` returns a file's text, or null when it does not exist. */
  static async load(readText, dir) {
    const json = await readText(`${dir}/tokenizer.json`);
    if (json === null) throw new Error(`bundle file missing: ${dir}/tokenizer.json (the web runtime needs it)`);
    const config = await readText(`${dir}/tokenizer_config.json`);
    const map = await readText(`${dir}/special_tokens_map.json`);
    const parse = (text, name) => {
      try {
        return JSON.parse(text);
      } catch (e) {
        throw new Error(`${dir}/${name} is not valid JSON: ${e.message}`);
      }
    };
    return new ClipTokenizer(
      parse(json, "tokenizer.json"),
      config === null ? {} : parse(config, "tokenizer_config.json"),
      map === null ? null : parse(map, "special_tokens_map.json"),
    );
  }

  /** Text token ids (no bos/eos), untruncated. */
  textIds(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** One prompt -> { ids: number[77], dropped: text tokens cut off past 75 }. */
  encodeOne(text) {
    const textIds = this.textIds(text);
    const kept = textIds.slice(0, MAX_LENGTH - 2);
    const ids = [this.bos, ...kept, this.eos];
    while (ids.length < MAX_LENGTH) ids.push(this.pad);
    return { ids, dropped: textIds.length - kept.length };
  }

  /** Prompts -> BigInt64Array (batch*77), the text encoder's `input_ids`. */
  encode(texts) {
    const list = typeof texts === "string" ? [texts] : texts;
    const out = new BigInt64Array(list.length * MAX_LENGTH);
    list.forEach((text, b) => {
      const { ids, dropped } = this.encodeOne(text);
      if (dropped > 0) console.warn(`prompt is longer than CLIP's ${MAX_LENGTH} tokens; dropped its last ${dropped} token(s)`);
      ids.forEach((id, i) => (out[b * MAX_LENGTH + i] = BigInt(id)));
    });
    return out;
  }
}
