//! `tandem-api`: a Cinder v3 compatible block-storage service.
