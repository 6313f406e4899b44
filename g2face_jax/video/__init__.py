"""Videos: decoding and writing (`io`), face tracks (`tracking`), the recovery data an
output carries (`stamp`), and anonymize / recover with a `photo.Anonymizer` (`anonymize`)."""
from g2face_jax.video.anonymize import (MATCH_THRESHOLD, Options, analyze, anonymize_video,
                                        recover_video)
from g2face_jax.video.io import OUTPUT_SUFFIX, VIDEO_SUFFIXES, is_video

__all__ = ["MATCH_THRESHOLD", "Options", "analyze", "anonymize_video", "recover_video",
           "is_video",
           "OUTPUT_SUFFIX", "VIDEO_SUFFIXES"]
