"""Damaged reads files and the error each must give (file, line, words of the message):
one corpus for the reader (tests/test_reads.py) and the plan pass's scanner
(tests/test_scan.py), which must raise the reader's very errors."""

FASTA_DAMAGE = [
    (b"ACGT\n>r\nAC\n", 1, "text before the first record"),
    (b">r1\nACGT\n>\nAC\n", 3, "a '>' header with no id after it. Give every record an id right after '>' (e.g. '>read_1')"),
    (b">r1\nAC\x00\x01\x02GT\n", 2, "binary"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, "this is a PNG image"),
    (b">r1\nACGT\n>\xff\xfe\nAC\n", 3, "not UTF-8"),
]

FASTQ_DAMAGE = [
    (b"r1\nACGT\n+\nIIII\n", 1, "text before the first record"),
    (b"@r1\nACGT\nIIII\n", 3, "expected the '+' line of the FASTQ record whose header is line 1, found 'IIII'"),
    (b"@r1\nACGT\nACGT\n+\nIIIIIIII\n", 3, "multi-line FASTQ is not supported"),
    (b"@r1\nACGT\n+\nIII\n", 4, "the quality line has 3 characters for a sequence of 4"),
    (b"@r1\nACGT\n+\nIIIII\n", 4, "the quality line has 5 characters for a sequence of 4"),
    (b"@r1\nACGT\n+\nIIII\n@r2\nAC\n+\n", 5, "the last FASTQ record is cut short: 3 of its 4 lines"),
    (b"@r1\nACGT\n+\nIIII\n@r2\n", 5, "cut short: 1 of its 4 lines"),
    (b"@r1\nACGT\n+\nIIII\n@r2\nAC\n+\nI", 8, "the quality line has 1 characters for a sequence of 2"),
    (b"@r1\nACGT\n+\nIIII\nr2\nAC\n+\nII\n", 5, "expected a FASTQ header starting with '@', found 'r2'"),
    (b"@r1\nACGT\n+\nIIII\n\n@r2\nAC\n+\nII\n", 5, "a blank line between FASTQ records"),
    (b"@\nACGT\n+\nIIII\n", 1, "a '@' header with no id after it"),
    (b"@ \xff\xfe\nACGT\n+\nIIII\n", 1, "the header is not UTF-8 text"),
    (b"@r1\nAC\x00GT\n+\nIIII\n", 2, "binary data (a NUL byte)"),
]
