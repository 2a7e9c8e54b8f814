"""Where faces are: warps between a photo and a canonical crop (with exact adjoints), the alignment
that frames a face from its landmarks, the BlazeFace detector, and face sites (find, select, embed,
re-match). Nothing here attacks or measures visibility."""
