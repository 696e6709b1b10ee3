"""racnn: RA-CNN (Fu, Zheng, Mei, "Look Closer to See Better", CVPR 2017) for weakly supervised
fine-grained image recognition."""

__version__ = "0.1.0"
