"""lineinspect.vision"""
