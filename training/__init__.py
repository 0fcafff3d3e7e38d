"""lineinspect.training"""
