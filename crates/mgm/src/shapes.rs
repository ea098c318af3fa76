//! The procedural dataset the default model is trained on: images of one to three coloured
//! shapes (circle, square, triangle, star in six colours, one per quadrant, varied positions
//! and sizes, on a noisy background) with questions and single-answer replies:
//!
//! - "What colour is the square?" -> "red" (asked of a shape that appears once);
//! - "How many shapes are there?" -> "one" / "two" / "three";
//! - "Is there a red circle?" -> "yes" / "no" (half and half);
//! - "Where is the triangle?" -> "top left" / "top right" / "bottom left" / "bottom right".
//!
//! Training mixes in captions ([`caption_sample`]: "Describe the image." -> "square red top
//! left, star blue bottom right").
//!
//! Sample `i` of a split is a pure function of the split's seed and `i`, so a training run can
//! stop and resume anywhere and the held-out split never overlaps the training one.
//!
//! ```
//! let s = mgm::shapes::sample(7, 0, 64);
//! assert_eq!((s.image.width(), s.image.height()), (64, 64));
//! assert!(s.question.ends_with('?') && !s.answer.is_empty());
//! ```

use mgm_vision::RgbImage;

/// The colours and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 225]),
    ("yellow", [235, 215, 40]),
    ("purple", [150, 60, 190]),
    ("orange", [245, 140, 30]),
];
/// The shapes.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];
/// Where an object is: its quadrant.
pub const PLACES: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];
const COUNTS: [&str; 3] = ["one", "two", "three"];

/// One object: shape and colour indices, quadrant, centre and radius as fractions of the image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`PLACES`].
    pub quadrant: usize,
    cx: f32,
    cy: f32,
    r: f32,
}

/// A rendered sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The picture.
    pub image: RgbImage,
    /// The objects in it.
    pub objects: Vec<Object>,
    /// The question.
    pub question: String,
    /// The expected answer.
    pub answer: String,
}

/// SplitMix64: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// True when (x, y), relative to the centre in radii, is inside the shape.
fn inside(shape: usize, x: f32, y: f32) -> bool {
    match shape {
        0 => x * x + y * y <= 1.0,
        1 => x.abs() <= 0.8 && y.abs() <= 0.8,
        2 => {
            // an upright triangle: apex (0, -1), base at y = 0.7, half width 0.95 there
            (-1.0..=0.7).contains(&y) && x.abs() <= 0.95 * (y + 1.0) / 1.7
        }
        _ => {
            // a five-pointed star: radius between 0.45 and 1 by angle
            let r = (x * x + y * y).sqrt();
            let a = y.atan2(x) + std::f32::consts::FRAC_PI_2;
            let sector = std::f32::consts::TAU / 5.0;
            let t = (a.rem_euclid(sector) / sector - 0.5).abs() * 2.0; // 0 at a point, 1 between
            r <= 1.0 - 0.55 * t
        }
    }
}

/// The scene of sample `index` of the split `seed`.
fn scene(rng: &mut Rng) -> Vec<Object> {
    let n = 1 + rng.below(3);
    let mut quadrants = [0, 1, 2, 3];
    for i in (1..4).rev() {
        quadrants.swap(i, rng.below(i + 1));
    }
    quadrants[..n]
        .iter()
        .map(|&q| {
            let r = 0.15 + 0.07 * rng.unit();
            let (qx, qy) = ((q % 2) as f32 * 0.5, (q / 2) as f32 * 0.5);
            let span = 0.5 - 2.0 * r - 0.04;
            Object {
                shape: rng.below(SHAPES.len()),
                colour: rng.below(COLOURS.len()),
                quadrant: q,
                cx: qx + 0.02 + r + span * rng.unit(),
                cy: qy + 0.02 + r + span * rng.unit(),
                r,
            }
        })
        .collect()
}

fn render(objects: &[Object], size: usize, rng: &mut Rng) -> RgbImage {
    let base: [i32; 3] = [
        90 + rng.below(60) as i32,
        90 + rng.below(60) as i32,
        90 + rng.below(60) as i32,
    ];
    let mut data = Vec::with_capacity(size * size * 3);
    for py in 0..size {
        for px in 0..size {
            let (x, y) = (
                (px as f32 + 0.5) / size as f32,
                (py as f32 + 0.5) / size as f32,
            );
            let hit = objects
                .iter()
                .find(|o| inside(o.shape, (x - o.cx) / o.r, (y - o.cy) / o.r));
            let noise = rng.below(31) as i32 - 15;
            let c = match hit {
                Some(o) => COLOURS[o.colour].1.map(i32::from),
                None => base,
            };
            data.extend(c.map(|v| (v + noise).clamp(0, 255) as u8));
        }
    }
    RgbImage::new(size, size, data).expect("size * size * 3 bytes")
}

/// Sample `index` of the split `seed`: a `size` x `size` image and one question about it.
pub fn sample(seed: u64, index: u64, size: usize) -> Sample {
    let mut rng = Rng::new(seed, index);
    let objects = scene(&mut rng);
    let image = render(&objects, size, &mut rng);
    let unique: Vec<&Object> = objects
        .iter()
        .filter(|o| objects.iter().filter(|p| p.shape == o.shape).count() == 1)
        .collect();
    let (question, answer) = loop {
        match rng.below(4) {
            0 if !unique.is_empty() => {
                let o = unique[rng.below(unique.len())];
                break (
                    format!("What colour is the {}?", SHAPES[o.shape]),
                    COLOURS[o.colour].0.to_string(),
                );
            }
            1 => {
                break (
                    "How many shapes are there?".to_string(),
                    COUNTS[objects.len() - 1].to_string(),
                );
            }
            2 => {
                let (shape, colour, yes) = if rng.below(2) == 0 {
                    let o = objects[rng.below(objects.len())];
                    (o.shape, o.colour, true)
                } else {
                    let (s, c) = loop {
                        let (s, c) = (rng.below(SHAPES.len()), rng.below(COLOURS.len()));
                        if !objects.iter().any(|o| o.shape == s && o.colour == c) {
                            break (s, c);
                        }
                    };
                    (s, c, false)
                };
                break (
                    format!("Is there a {} {}?", COLOURS[colour].0, SHAPES[shape]),
                    if yes { "yes" } else { "no" }.to_string(),
                );
            }
            3 if !unique.is_empty() => {
                let o = unique[rng.below(unique.len())];
                break (
                    format!("Where is the {}?", SHAPES[o.shape]),
                    PLACES[o.quadrant].to_string(),
                );
            }
            _ => {}
        }
    };
    Sample {
        image,
        objects,
        question,
        answer,
    }
}

/// The question of a caption sample ([`caption_sample`]).
pub const CAPTION_PROMPT: &str = "Describe the image.";

/// The caption of a scene: every object as shape, colour and place, in shape order
/// ("circle blue bottom right, square red top left"), or when `by_colour` as colour, shape
/// and place in colour order ("red square top left, blue circle bottom right"). Each object's
/// first word selects it and the rest is looked up: the lookups by shape and by colour the
/// questions ask for, practised on every object.
pub fn caption(objects: &[Object], by_colour: bool) -> String {
    let mut sorted = objects.to_vec();
    if by_colour {
        sorted.sort_by_key(|o| (o.colour, o.quadrant));
    } else {
        sorted.sort_by_key(|o| (o.shape, o.quadrant));
    }
    sorted
        .iter()
        .map(|o| {
            let (c, s, p) = (COLOURS[o.colour].0, SHAPES[o.shape], PLACES[o.quadrant]);
            if by_colour {
                format!("{c} {s} {p}")
            } else {
                format!("{s} {c} {p}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sample `index` of the split `seed` as a caption: [`sample`]'s scene and image with
/// [`CAPTION_PROMPT`] as the question and the scene's [`caption`] (in shape or colour order,
/// seeded by `index`) as the answer. LLaVA and MGM train on captions as well as instructions;
/// here a caption practises, on every object, the lookup by shape or colour that a question
/// asks for once (captions in quadrant order did not help: crates/mgm/README.md).
pub fn caption_sample(seed: u64, index: u64, size: usize) -> Sample {
    let mut s = sample(seed, index, size);
    s.question = CAPTION_PROMPT.to_string();
    s.answer = caption(
        &s.objects,
        Rng::new(seed ^ 0x00C0_100B, index).below(2) == 1,
    );
    s
}

/// Sample `index` of a training split where a `captions` fraction of the samples (chosen by
/// index, seeded) are [`caption_sample`]s and the rest [`sample`]s.
pub fn training_sample(seed: u64, index: u64, size: usize, captions: f64) -> Sample {
    if f64::from(Rng::new(seed ^ 0xCA97_10A5, index).unit()) < captions {
        caption_sample(seed, index, size)
    } else {
        sample(seed, index, size)
    }
}

/// The split of the README's example image (neither the training split nor the held-out one).
pub const EXAMPLE_SEED: u64 = 424_242;

/// The first sample of the example split whose scene has exactly one square, rendered at
/// `size`, and its index; written as a PNG to `path` when given.
pub fn example(size: usize, path: Option<&std::path::Path>) -> crate::Result<(u64, Sample)> {
    let (index, s) = (0..)
        .map(|i| (i, sample(EXAMPLE_SEED, i, size)))
        .find(|(_, s)| {
            s.objects
                .iter()
                .filter(|o| SHAPES[o.shape] == "square")
                .count()
                == 1
        })
        .expect("some scene has one square");
    if let Some(p) = path {
        let img = image::RgbImage::from_raw(size as u32, size as u32, s.image.as_bytes().to_vec())
            .expect("size * size * 3 bytes");
        img.save(p).map_err(|e| crate::Error::Io {
            path: p.display().to_string(),
            source: std::io::Error::other(e),
        })?;
    }
    Ok((index, s))
}

/// GPT-2's byte-to-character map of byte-level tokenizers: printable bytes stand for
/// themselves, the others for the characters from U+0100 on.
fn byte_chars() -> Vec<char> {
    let keep =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if keep(b) {
                char::from_u32(b).expect("a byte is a char")
            } else {
                let c = char::from_u32(next).expect("below U+0200");
                next += 1;
                c
            }
        })
        .collect()
}

/// The words of the dataset's questions and answers besides the colours and shapes.
const WORDS: [&str; 23] = [
    "What", "colour", "is", "the", "How", "many", "shapes", "are", "there", "Is", "a", "Where",
    "yes", "no", "one", "two", "three", "top", "bottom", "left", "right", "Describe", "image",
];

/// The default model's tokenizer, a small byte-level BPE: one token per byte (ids 0..=255),
/// `<s>` (256, added in front by the post-processor), `</s>` (257), `<pad>` (258), then every
/// word of the dataset ([`COLOURS`], [`SHAPES`] and the question words) as one token, bare and
/// with GPT-2's leading-space mark (`Ġ`). Whole words in the vocabulary map to their token
/// directly (`ignore_merges`), any other text falls back to bytes, so every prompt encodes.
/// A byte-per-token model has to assemble words from letters before it can match "red" in a
/// question with the red thing in the image: three decoder layers did not manage both (the
/// "is there a red circle?" questions stayed at chance). As `tokenizer.json` and
/// `tokenizer_config.json` for the `tokenizers` crate and transformers alike.
pub fn tokenizer() -> (serde_json::Value, serde_json::Value) {
    let mut vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    // the specials are in the model's vocabulary too: tokenizers gives an added token that is
    // not one the next free id, whatever tokenizer.json says
    for (i, t) in ["<s>", "</s>", "<pad>"].into_iter().enumerate() {
        vocab.insert(t.to_string(), serde_json::json!(256 + i));
    }
    let words = COLOURS.iter().map(|c| c.0).chain(SHAPES).chain(WORDS);
    for w in words {
        for t in [w.to_string(), format!("\u{120}{w}")] {
            // "a" is a byte already
            if !vocab.contains_key(&t) {
                let id = vocab.len();
                vocab.insert(t, serde_json::json!(id));
            }
        }
    }

    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                                        "trim_offsets": false, "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(256, "<s>"), added(257, "</s>"), added(258, "<pad>")],
        "normalizer": null, "pre_tokenizer": byte_level, "decoder": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}
        },
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": true, "vocab": vocab, "merges": []}
    });
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                 "add_bos_token": true, "model_max_length": 256,
                                 "tokenizer_class": "PreTrainedTokenizerFast"});
    (tok, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokenizer_has_a_token_per_word_and_bytes_for_the_rest() {
        let (tok, cfg) = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = mgm_llm::Tokenizer::from_dir(dir.path()).unwrap();
        let ids = |s: &str| t.encode(s, false).unwrap();
        // one token per word and one for "?"
        assert_eq!(ids("What colour is the square?").len(), 6);
        assert_eq!(ids("Is there a red circle?").len(), 6);
        assert_eq!(ids("green").len(), 1);
        assert_eq!(ids("top left").len(), 2);
        // unknown words are bytes, and everything decodes back
        assert_eq!(
            ids("zq!"),
            vec![u32::from(b'z'), u32::from(b'q'), u32::from(b'!')]
        );
        for s in [
            "What colour is the square?",
            "bottom right",
            "Where is the star? Ünïcode",
        ] {
            assert_eq!(t.decode(&ids(s), false).unwrap(), s);
        }
        assert_eq!(
            (t.token_to_id("<s>"), t.token_to_id("</s>")),
            (Some(256), Some(257))
        );
        // the config's vocab_size is the tokenizer's
        let n = t.vocab_size();
        let cfg = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/shapes.toml"),
        )
        .unwrap();
        assert!(
            cfg.contains(&format!("vocab_size = {n}\n")),
            "configs/shapes.toml vocab_size != {n}"
        );
    }

    #[test]
    fn captions_name_every_object_and_mix_at_the_asked_rate() {
        let mut orders = [0, 0];
        for i in 0..200 {
            let s = caption_sample(1, i, 32);
            assert_eq!(s.question, CAPTION_PROMPT);
            // parse the caption back into (shape, colour, quadrant) triples
            let shape_first = SHAPES.iter().any(|x| s.answer.starts_with(x));
            orders[usize::from(shape_first)] += 1;
            let mut got: Vec<(usize, usize, usize)> = s
                .answer
                .split(", ")
                .map(|part| {
                    let w: Vec<&str> = part.split(' ').collect();
                    assert_eq!(w.len(), 4, "{part:?}");
                    let place = PLACES.iter().position(|p| *p == w[2..].join(" ")).unwrap();
                    let (sh, co) = if shape_first {
                        (w[0], w[1])
                    } else {
                        (w[1], w[0])
                    };
                    (
                        SHAPES.iter().position(|x| *x == sh).unwrap(),
                        COLOURS.iter().position(|x| x.0 == co).unwrap(),
                        place,
                    )
                })
                .collect();
            let mut want: Vec<_> = s
                .objects
                .iter()
                .map(|o| (o.shape, o.colour, o.quadrant))
                .collect();
            // the objects are in the order of their first word
            let keys: Vec<usize> = got
                .iter()
                .map(|g| if shape_first { g.0 } else { g.1 })
                .collect();
            assert!(keys.windows(2).all(|k| k[0] <= k[1]), "{:?}", s.answer);
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "sample {i}: {:?}", s.answer);
            // the same scene and image as the question sample
            assert_eq!(s.image.as_bytes(), sample(1, i, 32).image.as_bytes());
        }
        assert!(
            orders[0] > 50 && orders[1] > 50,
            "both orders occur: {orders:?}"
        );
        let n = (0..1000)
            .filter(|&i| training_sample(1, i, 16, 0.3).question == CAPTION_PROMPT)
            .count();
        assert!((240..360).contains(&n), "{n} captions in 1000 at 0.3");
        assert!((0..100).all(|i| training_sample(1, i, 16, 0.0).question != CAPTION_PROMPT));
    }

    #[test]
    fn questions_are_answerable_from_the_scene() {
        for i in 0..300 {
            let s = sample(1, i, 48);
            let n = s.objects.len();
            assert!((1..=3).contains(&n));
            let q = s.question.as_str();
            if q == "How many shapes are there?" {
                assert_eq!(s.answer, COUNTS[n - 1]);
            } else if let Some(rest) = q.strip_prefix("What colour is the ") {
                let shape = rest.trim_end_matches('?');
                let o = s.objects.iter().find(|o| SHAPES[o.shape] == shape).unwrap();
                assert_eq!(s.answer, COLOURS[o.colour].0);
            } else if let Some(rest) = q.strip_prefix("Where is the ") {
                let shape = rest.trim_end_matches('?');
                let o = s.objects.iter().find(|o| SHAPES[o.shape] == shape).unwrap();
                assert_eq!(s.answer, PLACES[o.quadrant]);
            } else {
                let rest = q.strip_prefix("Is there a ").unwrap().trim_end_matches('?');
                let (c, sh) = rest.split_once(' ').unwrap();
                let present = s
                    .objects
                    .iter()
                    .any(|o| COLOURS[o.colour].0 == c && SHAPES[o.shape] == sh);
                assert_eq!(s.answer, if present { "yes" } else { "no" });
            }
            // every object is drawn: its centre pixel has its colour (give or take the noise)
            for o in &s.objects {
                let (x, y) = ((o.cx * 48.0) as usize, (o.cy * 48.0) as usize);
                let p = s.image.pixel(x, y);
                let want = COLOURS[o.colour].1;
                assert!(
                    p.iter()
                        .zip(want)
                        .all(|(a, b)| (i32::from(*a) - i32::from(b)).abs() <= 15),
                    "sample {i}: {p:?} vs {want:?}"
                );
            }
        }
        assert_eq!(
            sample(1, 5, 48).image.as_bytes(),
            sample(1, 5, 48).image.as_bytes()
        );
    }
}
