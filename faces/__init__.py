"""Step 0 of graft: photos -> aligned face crops, as a dataset extract reads unchanged.

detectors/ (one module per detector family, converted Caffe packages run through extract's
backends) -> align (margin, square, similarity warp to a template) -> dataset (crops + faces.csv,
resumable by content hash) -> report (contact sheet).
"""
