//! The hand-written PTX of every family, embedded from the workspace's `kernels/` directory.

macro_rules! kernel_file {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../kernels/",
                $name,
                ".ptx"
            )),
        )
    };
}

/// `(family, source)` for every kernel file, in a fixed order.
pub const SOURCES: &[(&str, &str)] = &[
    // Families add themselves here as their .ptx lands, e.g. kernel_file!("softmax").
    kernel_file!("softmax"),
    kernel_file!("rms_norm"),
    kernel_file!("layer_norm_gelu"),
    kernel_file!("windowed_attention"),
    kernel_file!("topk_attention"),
];

/// The PTX source of a family, if it has one.
pub fn source(family: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(f, _)| *f == family).map(|(_, s)| *s)
}
