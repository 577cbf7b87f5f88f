//! A read-only image open while another process writes the same file (what `-U` inspection
//! does): clusters the writer allocates after the reader opened lie past the end of the file
//! the reader saw, and must read as the writer's data, not as a corrupt entry.

use std::sync::Arc;

use qed::{CreateOptions, GuestOffset, Image, MemStorage, OpenOptions};

#[test]
fn a_read_only_image_reads_clusters_another_writer_allocated_after_it_opened() {
    let mut options = CreateOptions::new(16 << 20);
    options.cluster_size = 65536;
    let file = MemStorage::new();
    Image::create(&file, &options).unwrap();
    let file = Arc::new(file);
    let writer = Image::open(Box::new(file.clone()), OpenOptions::default()).unwrap();
    // One cluster now, so that the L2 table exists before the reader opens.
    writer.write_at(&[1u8; 65536], GuestOffset(0)).unwrap();
    writer.flush().unwrap();
    let reader = Image::open(
        Box::new(file.clone()),
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    // The writer grows the file; its L2 table now names a cluster past the reader's end.
    writer.write_at(&[2u8; 65536], GuestOffset(65536)).unwrap();
    writer.flush().unwrap();
    let mut buf = vec![0u8; 65536];
    reader.read_at(&mut buf, GuestOffset(65536)).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "the writer's data");
    reader.read_at(&mut buf, GuestOffset(0)).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
}
